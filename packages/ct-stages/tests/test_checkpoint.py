import json

import torch

import ct_model
from ct_parallel import build_native_engine
from ct_stages import CheckpointManager


def engine(seed):
    model = ct_model.build_model(ct_model.presets.get("mobilellm_tiny", num_layers=1, vocab_size=32), seed=seed)
    e = build_native_engine(model)
    e.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    return e, model


def test_save_load_roundtrip_and_keep_last(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    source, model = engine(0)
    for step in (1, 2, 3):
        manager.save(step, source, {"step": step, "loader": {"pos": step}})
    assert [p.name for p in manager.complete()] == ["step_00000002", "step_00000003"]
    target, other = engine(1)
    state = manager.load(manager.latest(), target)
    assert state["step"] == 3 and state["loader"] == {"pos": 3}
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


def test_interrupted_save_is_never_taken_for_a_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    source, _ = engine(0)
    manager.save(1, source, {"step": 1})
    # What a SIGKILL in the middle of writing step 2 leaves behind:
    partial = tmp_path / ".tmp-step_00000002"
    (partial / "engine").mkdir(parents=True)
    (partial / "trainer_rank0.pt").write_bytes(b"truncated")
    # ...and a renamed directory without meta.json (e.g. copied by hand) does not count either.
    (tmp_path / "step_00000005").mkdir()
    assert manager.latest().name == "step_00000001"
    manager.save(3, source, {"step": 3})
    assert not partial.exists()  # cleaned by the next successful save
    assert json.loads((manager.latest() / "meta.json").read_text())["step"] == 3


def _damage_truncate(ckpt):
    shard = next((ckpt / "engine").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    return shard


def _damage_delete(ckpt):
    victim = ckpt / "trainer_rank0.pt"
    victim.unlink()
    return victim


def _damage_flip(ckpt):
    shard = next((ckpt / "engine").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    return shard


import pytest  # noqa: E402


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_delete, _damage_flip])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, damage):
    manager = CheckpointManager(tmp_path, keep_last=3)
    source, _ = engine(0)
    for step in (1, 2):
        manager.save(step, source, {"step": step})
    meta = json.loads((tmp_path / "step_00000002" / "meta.json").read_text())
    assert "trainer_rank0.pt" in meta["files"] and meta["engine"] == "native"
    victim = damage(tmp_path / "step_00000002")
    with caplog.at_level("WARNING", logger="ct_stages"):
        assert manager.latest_verified().name == "step_00000001"
    assert str(victim) in caplog.text


def test_no_verifying_checkpoint_is_an_error_listing_each(tmp_path):
    from ct_stages.checkpoint import CheckpointError

    manager = CheckpointManager(tmp_path, keep_last=3)
    source, _ = engine(0)
    for step in (1, 2):
        manager.save(step, source, {"step": step})
    first, second = _damage_flip(tmp_path / "step_00000001"), _damage_delete(tmp_path / "step_00000002")
    with pytest.raises(CheckpointError) as err:
        manager.latest_verified()
    assert str(first) in str(err.value) and str(second) in str(err.value)


def test_a_full_disk_stops_the_save_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from ct_stages.checkpoint import CheckpointError

    manager = CheckpointManager(tmp_path, keep_last=3)
    source, _ = engine(0)
    manager.save(1, source, {"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)  # the fault-injection point: the trainer-state write
    with pytest.raises(CheckpointError, match=str(tmp_path)) as err:
        manager.save(2, source, {"step": 2})
    assert "No space left" in str(err.value)
    assert not any(p.name.endswith("step_00000002") for p in tmp_path.iterdir())  # no partial step
    monkeypatch.undo()
    assert manager.latest_verified().name == "step_00000001"  # intact, and it still verifies
    manager.save(2, source, {"step": 2})  # with space again
    assert manager.latest_verified().name == "step_00000002"

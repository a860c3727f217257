import json

import pytest
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


def test_an_async_checkpoint_holds_the_state_at_save_time_and_counts_only_once_written(tmp_path):
    """The async save copies the state before returning: training on (changing the weights and the
    optimizer) does not leak into it; until the write is done nothing new counts as complete."""
    manager = CheckpointManager(tmp_path)
    source, model = engine(0)
    manager.save(1, source, {"step": 1})
    model(torch.randint(0, 32, (2, 8))).sum().backward()
    source.optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    final = manager.save(2, source, {"step": 2}, asynchronous=True)
    assert manager.latest().name in ("step_00000001", "step_00000002")
    if manager.latest() == final:  # already written: then its manifest is there too
        assert json.loads((final / "meta.json").read_text())["files"]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the loop goes on while the write runs
    assert manager.wait() == final
    assert manager.latest_verified() == final
    target, other = engine(1)
    assert manager.load(final, target)["step"] == 2
    for name, value in other.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_an_async_write_that_fails_is_reported_and_removed(tmp_path, monkeypatch):
    import errno

    from ct_stages import checkpoint as ckpt

    manager = CheckpointManager(tmp_path)
    source, _ = engine(0)
    manager.save(1, source, {"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "manifest", full)  # fails in the background thread, hashing
    manager.save(2, source, {"step": 2}, asynchronous=True)
    with pytest.raises(ckpt.CheckpointError, match="No space left"):
        manager.wait()
    assert not any(p.name.endswith("step_00000002") for p in tmp_path.iterdir())
    monkeypatch.undo()
    assert manager.latest_verified().name == "step_00000001"


def _megatron_meta(tmp_path, **layout):
    base = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "use_distributed_optimizer": False}
    path = tmp_path / "step_00000002"
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"step": 2, "world_size": 2, "engine": "megatron",
                                                "layout": {**base, **layout}}))
    return path, base


def test_megatron_resume_refuses_another_world_size_and_a_resharded_distributed_optimizer(tmp_path, monkeypatch):
    from ct_stages import checkpoint as ckpt

    path, base = _megatron_meta(tmp_path, use_distributed_optimizer=True)
    monkeypatch.setattr(ckpt, "_world_size", lambda: 1)
    manager = CheckpointManager(tmp_path, metadata={"engine": "megatron", "layout": base})
    with pytest.raises(ckpt.CheckpointError, match="own world size.*init_from"):
        manager.load(path, engine=None)
    monkeypatch.setattr(ckpt, "_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ckpt.CheckpointError, match="distributed optimizer.*GPU only.*use_distributed_optimizer=True"):
        manager.load(path, engine=None)


def test_writer_of_reads_the_writing_rank_off_dcp_megatron_and_trainer_names():
    from ct_stages.checkpoint import writer_of

    by_hand = {"engine/__3_0.distcp": 3, "engine/__12_7.distcp": 12, "engine/__5.metadata": 5,
               "trainer_rank9.pt": 9, "engine/.metadata": 0, "engine/metadata.json": 0, "engine/common.pt": 0,
               "engine/x_trainer_rank4.pt": 0, "engine/__1_0.distcp.tmp": 0}
    assert {name: writer_of(name) for name in by_hand} == by_hand


def test_the_manifest_is_every_file_hashed_and_a_share_per_rank_covers_it_once(tmp_path):
    import hashlib

    from ct_stages.checkpoint import shares

    manager = CheckpointManager(tmp_path)
    source, _ = engine(0)
    path = manager.save(1, source, {"step": 1})
    files = json.loads((path / "meta.json").read_text())["files"]
    by_hand = {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
               for p in path.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert files == by_hand
    # Balanced by bytes, largest first to the least-loaded rank (ties: the lower rank), by hand:
    sizes = {"a": {"size": 10}, "b": {"size": 9}, "c": {"size": 8}, "d": {"size": 2}, "e": {"size": 1}}
    assert shares(sizes, 2) == [["a", "d", "e"], ["b", "c"]]
    assert shares(sizes, 1) == [["a", "b", "c", "d", "e"]]
    assert shares(sizes, 7)[5:] == [[], []]


def test_each_share_checks_only_its_files_and_together_they_find_a_damaged_one(tmp_path):
    from ct_stages.checkpoint import verify

    manager = CheckpointManager(tmp_path)
    source, _ = engine(0)
    path = manager.save(1, source, {"step": 1})
    victim = _damage_flip(path)
    found = [verify(path, rank, 3) for rank in range(3)]
    assert sorted(len(f) for f in found) == [0, 0, 1]  # one rank holds the damaged file
    assert sum(found, []) == verify(path) == [f"{victim}: checksum differs from the manifest"]


def _engine_of(**fields):
    model = ct_model.build_model(ct_model.presets.get("mobilellm_tiny", vocab_size=32, **fields), seed=0)
    e = build_native_engine(model)
    e.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    return e, model


@pytest.mark.parametrize("saved, now, needle", [
    ({"num_layers": 2}, {"num_layers": 1}, "the checkpoint has and the model lacks"),  # a partial load before
    ({"num_layers": 1}, {"num_layers": 2}, "the model has and the checkpoint lacks"),
], ids=["fewer_layers", "more_layers"])
def test_loading_another_models_checkpoint_is_refused_and_loads_nothing(tmp_path, saved, now, needle):
    from ct_model import UserError

    manager = CheckpointManager(tmp_path)
    manager.save(1, _engine_of(**saved)[0], {"step": 1})
    target, model = _engine_of(**now)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(UserError, match=needle) as refused:
        manager.load(manager.latest(), target)
    assert "written for another model" in str(refused.value) and "move it aside" not in str(refused.value)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))

"""optimizer=muon through ct-train: FSDP2 x 2 (gloo, CPU) steps the parameters as one process
does (dense, and MoE with 3-D expert tensors), a checkpoint resumes exactly at another world size
(single -> FSDP2, DDP -> single; momentum buffers included), and the megatron engine and bad
values are refused with exit 2 naming the key."""

from __future__ import annotations

import pytest
import torch

from cli_support import TINY, ct, events, train_losses
from ct_cli import train as train_cli

MUON = ["optimizer=muon", "optimizer.muon_lr=0.01", "trainer.max_steps=4"]


def hf_tensors(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "hf" / "model.safetensors"))


def train(run, sample_dir, *args: str) -> None:
    ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY, *MUON, *args)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, sample_dir):
    run = tmp_path_factory.mktemp("muon") / "single"
    train(run, sample_dir)
    return run


@pytest.mark.dist
@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_two_processes_give_the_single_process_parameters(tmp_path, sample_dir, single_run, strategy):
    """FSDP2 shards every matrix by rows: Muon must orthogonalise the gathered matrix, not the
    shard. DDP: every rank orthogonalises the same all-reduced gradient."""
    run = tmp_path / strategy
    train(run, sample_dir, "--nproc-per-node", "2", f"distributed={strategy}")
    start = next(e for e in events(run) if e["event"] == "start")
    assert start["optimizer"] == "MuonWithAdamW" and start["world_size"] == 2
    single, sharded = hf_tensors(single_run), hf_tensors(run)
    assert single.keys() == sharded.keys()
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=2e-5, msg=name)
    losses, expected = train_losses(run), train_losses(single_run)
    assert all(losses[s] == pytest.approx(expected[s], rel=1e-5) for s in expected)


@pytest.mark.dist
@pytest.mark.parametrize("first, then", [
    ([], ["--nproc-per-node", "2", "distributed=fsdp2"]),
    (["--nproc-per-node", "2", "distributed=ddp"], []),
], ids=["single-to-fsdp2", "ddp-to-single"])
def test_resume_at_another_world_size_is_exact(tmp_path, sample_dir, single_run, first, then):
    """Stopped at step 2, resumed to step 4 at another world size: DCP reshards (FSDP2) or gathers
    (DDP -> one process) the momentum buffers and AdamW moments; steps 3-4 are the uninterrupted
    single-process run's."""
    run = tmp_path / "resumed"
    train(run, sample_dir, "trainer.max_steps=2", *first)
    train(run, sample_dir, *then)
    assert [e["step"] for e in events(run) if e["event"] == "resume"] == [2]
    losses, expected = train_losses(run), train_losses(single_run)
    for step in (3, 4):
        assert losses[step] == pytest.approx(expected[step], rel=1e-6), step
    single, resumed = hf_tensors(single_run), hf_tensors(run)
    for name in single:
        torch.testing.assert_close(resumed[name], single[name], rtol=0, atol=2e-5, msg=name)


MOE = ["model=deepseek_v3_tiny", "trainer.max_steps=3"]


@pytest.mark.dist
def test_moe_experts_under_fsdp2_give_the_single_process_parameters(tmp_path, sample_dir):
    """MLA + MoE: the experts are 3-D [E, out, in] tensors, FSDP2 shards them by expert, and Muon
    orthogonalises every expert (gate and up apart) on the rank that owns the tensor; the router
    stays with AdamW. Two processes give the one process's parameters."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp2"
    train(single, sample_dir, *MOE)
    train(sharded, sample_dir, *MOE, "--nproc-per-node", "2", "distributed=fsdp2")
    want, got = hf_tensors(single), hf_tensors(sharded)
    assert any(".experts." in name for name in want)
    for name in want:  # measured: at most 6.2e-6 (the embedding, AdamW: fp32 reduction order)
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=2e-5, msg=name)
    losses, expected = train_losses(sharded), train_losses(single)
    assert sorted(losses) == [1, 2, 3]
    assert all(losses[s] == pytest.approx(expected[s], rel=1e-5) for s in expected)


@pytest.mark.parametrize("args, needle", [
    (["distributed=megatron_dp_distopt"], "optimizer.name=muon"),
    (["optimizer.muon_momentum=1.5"], "optimizer.muon_momentum"),
    (["optimizer.muon_adjust_lr=spectral"], "optimizer.muon_adjust_lr"),
])
def test_refusals_exit_2_naming_the_key(capsys, tmp_path, args, needle):
    code = train_cli.main(["--phase", "pretrain_phase1", f"run_dir={tmp_path / 'run'}", "optimizer=muon", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()

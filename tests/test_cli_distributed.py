"""ct-train under several processes (gloo, CPU): DDP and megatron TP=2 give the single-process losses."""

from __future__ import annotations

import sys

import pytest

from cli_support import ROOT, TINY, ct, train_losses

SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory, sample_dir):
    run = tmp_path_factory.mktemp("single")
    ct("train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY,
       "trainer.max_steps=3")
    return train_losses(run)


@pytest.mark.dist
def test_ddp_two_processes_match_single_process(tmp_path, sample_dir, single_losses):
    run = tmp_path / "ddp"
    ct("train", "--phase", "pretrain_phase1", "--nproc-per-node", "2", "distributed=ddp", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=3")
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3]
    assert all(losses[s] == pytest.approx(single_losses[s], rel=1e-5) for s in losses)
    assert (run / "hf" / "model.safetensors").is_file()


@pytest.mark.dist
def test_megatron_tp2_one_step_through_the_cli(tmp_path, sample_dir, single_losses):
    # megatron-core calls CUDA unconditionally in places: the test-only shim redirects those on CPU.
    run = tmp_path / "tp2"
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              str(SHIM_RUNNER)]
    ct("train", "--phase", "pretrain_phase1", "distributed=megatron_tp2", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=1", module_runner=runner)
    losses = train_losses(run)
    assert list(losses) == [1]
    assert losses[1] == pytest.approx(single_losses[1], rel=1e-5)
    assert (run / "hf" / "model.safetensors").is_file()


@pytest.mark.dist
@pytest.mark.slow
def test_fsdp2_bf16_two_processes_runs_the_readme_recipe_twin(tmp_path, sample_dir, single_losses):
    """The README's `distributed=fsdp2 precision=bf16`, CPU-sized: bf16 losses track the fp32 single
    run to bf16 resolution, and the export holds plain fp32 tensors (FSDP2 keeps fp32 shards)."""
    from safetensors import safe_open

    run = tmp_path / "fsdp2_bf16"
    ct("train", "--phase", "pretrain_phase1", "--nproc-per-node", "2", "distributed=fsdp2", "precision=bf16",
       f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=3")
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3]
    assert all(losses[s] == pytest.approx(single_losses[s], rel=2e-2) for s in losses), (losses, single_losses)
    with safe_open(str(run / "hf" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {__import__("torch").float32}

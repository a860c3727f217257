"""ct-train under several processes (gloo, CPU): DDP and megatron TP=2 give the single-process losses."""

from __future__ import annotations

import json
import sys

import pytest

from cli_support import ROOT, TINY, ct, events, kill_rank_one_mid_run, train_losses

SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"


@pytest.fixture(scope="module")
def single_losses(reference_losses):
    """The uninterrupted single-process run every layout is compared with (conftest's 8-step
    reference: its first losses do not depend on max_steps, so it serves the shorter runs too)."""
    return reference_losses


@pytest.mark.dist
def test_ddp_two_processes_match_single_process(tmp_path, sample_dir, single_losses):
    run = tmp_path / "ddp"
    ct("train", "--phase", "pretrain_phase1", "--nproc-per-node", "2", "distributed=ddp", f"run_dir={run}",
       f"sample_data.dir={sample_dir}", *TINY, "trainer.max_steps=3")
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3]
    assert all(losses[s] == pytest.approx(single_losses[s], rel=1e-5) for s in losses)
    assert (run / "hf" / "model.safetensors").is_file()

    # MFU per device, from the run's own logged figures: the global tokens/s over 2 devices.
    start = next(e for e in events(run) if e["event"] == "start")
    assert start["world_size"] == 2
    for record in (e for e in events(run) if e["event"] == "train"):
        per_device = record["tokens_per_s"] / 2
        assert record["tokens_per_s_per_device"] == pytest.approx(per_device)
        if record["mfu"] is None:
            assert "above the peak" in record["mfu_note"]
        else:
            assert record["mfu"] == pytest.approx(per_device * record["flops_per_token"] / record["peak_flops"])
            assert 0 < record["mfu"] <= 1


@pytest.mark.dist
def test_resume_at_another_world_size_continues_the_same_run(tmp_path, sample_dir, single_losses):
    """2-process DDP -> 1 process and 1 process -> 2-process FSDP2: DCP reshards the model and
    optimizer, the loader states of the saved ranks are merged; later losses equal the
    uninterrupted single-process run's."""
    common = [f"sample_data.dir={sample_dir}", *TINY]
    expected = single_losses

    shrink = tmp_path / "shrink"
    ct("train", "--phase", "pretrain_phase1", "--nproc-per-node", "2", "distributed=ddp", f"run_dir={shrink}",
       *common, "trainer.max_steps=2")
    ct("train", "--phase", "pretrain_phase1", f"run_dir={shrink}", *common, "trainer.max_steps=4")
    grow = tmp_path / "grow"
    ct("train", "--phase", "pretrain_phase1", f"run_dir={grow}", *common, "trainer.max_steps=2")
    ct("train", "--phase", "pretrain_phase1", "--nproc-per-node", "2", "distributed=fsdp2", f"run_dir={grow}",
       *common, "trainer.max_steps=4")
    for run in (shrink, grow):
        resumed = [e for e in events(run) if e["event"] == "resume"]
        assert resumed and resumed[0]["step"] == 2
        losses = train_losses(run)
        assert sorted(losses) == [1, 2, 3, 4]
        for step in (3, 4):
            assert losses[step] == pytest.approx(expected[step], rel=1e-6), (run.name, step)


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


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_tp2_survives_a_killed_rank_and_resumes_at_pp2(tmp_path, sample_dir, single_losses):
    """megatron TP=2 through the CLI (the test-only CPU shim): kill -9 of rank 1 mid-run ends the
    job within 60 s leaving only checkpoints that verify; the same command resumes and gives the
    single-process losses; ct-export reads its checkpoint into the run's own HF export; and the
    checkpoint (model and plain optimizer) resumes under PP=2 at the same world size
    (dist_checkpointing reshards both, the trainer state of the one data-parallel rank is used)
    with the later losses still equal to the single-process run's."""
    # megatron-core calls CUDA unconditionally in places: the test-only shim redirects those on CPU.
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
              str(SHIM_RUNNER)]
    common = [f"sample_data.dir={sample_dir}", *TINY, "distributed.timeout_minutes=1"]
    run = tmp_path / "tp2_then_pp2"
    tp2 = ["--phase", "pretrain_phase1", "distributed=megatron_tp2", f"run_dir={run}", *common, "trainer.max_steps=7"]
    kill_rank_one_mid_run([*runner, "ct_cli.train", *tp2], run)
    ct("train", *tp2, module_runner=runner)  # the same command resumes
    assert [e for e in events(run) if e["event"] == "resume"]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 8))
    assert all(losses[s] == pytest.approx(single_losses[s], rel=1e-5) for s in losses), (losses, single_losses)
    meta = json.loads((run / "checkpoints" / "step_00000007" / "meta.json").read_text())
    assert meta["engine"] == "megatron" and meta["layout"]["tensor_model_parallel_size"] == 2
    _export_reads_the_megatron_checkpoint(tmp_path, run)

    ct("train", "--phase", "pretrain_phase1", "distributed=megatron_pp2", f"run_dir={run}", *common,
       "trainer.max_steps=8", module_runner=runner)
    resumed = [e for e in events(run) if e["event"] == "resume"]
    assert resumed[-1]["step"] == 7
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert all(losses[s] == pytest.approx(single_losses[s], rel=1e-5) for s in losses), (losses, single_losses)


def _export_reads_the_megatron_checkpoint(tmp_path, run):
    """ct-export reads the megatron checkpoint (resharded TP=2 -> 1 by megatron) into the same HF
    model as the run's own export of those weights; without CUDA or the shim it refuses clearly."""
    import ct_model
    import torch

    refused = ct("export", str(run), str(tmp_path / "refused"), check=False)
    assert refused.returncode == 2 and "megatron engine" in refused.stderr and "Traceback" not in refused.stderr
    out = tmp_path / "exported"
    ct("export", str(run), str(out), module_runner=[sys.executable, str(SHIM_RUNNER)])
    ours, _ = ct_model.hf.load_hf(run / "hf")
    exported, _ = ct_model.hf.load_hf(out)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids), ours(ids), rtol=0, atol=1e-5)

"""Async checkpoints on the megatron engine (TP=2, the test-only CPU shim) through the CLI: a rank
killed mid-run leaves only checkpoints that verify, and the same command resumes with the
single-process run's losses. Its own file so that pytest-xdist runs it beside the other
minutes-long CLI tests."""

from __future__ import annotations

import json
import sys

import pytest

from cli_support import ROOT, TINY, ct, events, kill_rank_one_mid_run, train_losses

SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_async_checkpoints_survive_a_killed_rank_and_resume(tmp_path, sample_dir, reference_losses):
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SHIM_RUNNER)]
    run = tmp_path / "tp2_async"
    args = ["--phase", "pretrain_phase1", "distributed=megatron_tp2", "trainer.async_checkpoint=true",
            f"run_dir={run}", f"sample_data.dir={sample_dir}", *TINY, "distributed.timeout_minutes=1",
            "trainer.max_steps=7"]
    kill_rank_one_mid_run([*runner, "ct_cli.train", *args], run)
    ct("train", *args, module_runner=runner)  # the same command resumes
    records = events(run)
    assert [e for e in records if e["event"] == "resume"]
    saved = [e for e in records if e["event"] == "checkpoint"]
    assert saved and all(e["async"] for e in saved)
    # every checkpoint of the rerun was reported complete, each after its manifest was written
    rerun = records[max(i for i, e in enumerate(records) if e["event"] == "resume"):]
    started = [e["step"] for e in rerun if e["event"] == "checkpoint"]
    assert started == [e["step"] for e in rerun if e["event"] == "checkpoint_complete"] and started[-1] == 7
    meta = json.loads((run / "checkpoints" / "step_00000007" / "meta.json").read_text())
    assert meta["engine"] == "megatron" and "engine/metadata.json" in meta["files"]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 8))
    assert all(losses[s] == pytest.approx(reference_losses[s], rel=1e-5) for s in losses), (losses, reference_losses)

"""kill -9 of one rank of a 2-process run (gloo, CPU): the job ends, the same command resumes.

Its own file so that pytest-xdist (one file per worker) runs these minutes-long tests beside
test_cli_distributed.py rather than after it."""

from __future__ import annotations

import sys

import pytest

from cli_support import ROOT, TINY, events, kill_rank_one_mid_run, train_losses


@pytest.fixture(scope="module")
def single_losses(reference_losses):
    return reference_losses


KILL_COMMON = ["trainer.max_steps=8", "distributed.timeout_minutes=1"]
# layout -> (how ct-train is launched, its overrides)
KILL_LAYOUTS = {
    # background checkpoint writes on their own gloo group: a kill mid-write leaves nothing that counts
    "ddp_async": ([sys.executable, "-m"], ["--nproc-per-node", "2", "distributed=ddp", "trainer.async_checkpoint=true"]),
    "fsdp2": ([sys.executable, "-m"], ["--nproc-per-node", "2", "distributed=fsdp2"]),
}
# megatron TP=2 is killed the same way in
# test_cli_distributed.py::test_megatron_tp2_survives_a_killed_rank_and_resumes_at_pp2.


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(KILL_LAYOUTS))
def test_a_killed_rank_ends_the_job_and_the_rerun_resumes(tmp_path, sample_dir, single_losses, layout):
    """kill -9 of one rank mid-run: every process exits non-zero well within 60 s (torchrun's
    agent stops the other rank; its collectives fail fast on the closed peer, and the collective
    timeout bounds any other wait), no partial checkpoint counts, and the rerun resumes with the
    uninterrupted run's losses."""
    import subprocess

    runner, overrides = KILL_LAYOUTS[layout]
    run = tmp_path / "killed"
    command = ["ct_cli.train", "--phase", "pretrain_phase1", f"run_dir={run}", f"sample_data.dir={sample_dir}",
               *TINY, *KILL_COMMON, *overrides]
    kill_rank_one_mid_run([*runner, *command], run)

    rerun = subprocess.run([*runner, *command], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [e for e in events(run) if e["event"] == "resume"]
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert all(losses[s] == pytest.approx(single_losses[s], rel=1e-5) for s in losses)

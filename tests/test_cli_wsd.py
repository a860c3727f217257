"""schedule.name=wsd through ct-train: a decay branched from a stable-stage checkpoint (copy the run
directory, resume it with the decay's schedule and a larger trainer.max_steps) trains exactly as a
run that planned the decay from the start."""

from __future__ import annotations

import shutil

import pytest

from cli_support import TINY, ct, events, train_losses

WSD = ["schedule.name=wsd", "schedule.warmup_steps=1", "schedule.decay_steps=2", "schedule.decay_shape=1-sqrt",
       "trainer.max_steps=6"]


def lrs(run) -> dict[int, float]:
    return {e["step"]: e["lr"] for e in events(run) if e["event"] == "train"}


def test_a_decay_branched_from_a_stable_checkpoint_matches_the_planned_run(tmp_path, sample_dir):
    common = ["--phase", "pretrain_phase1", f"sample_data.dir={sample_dir}", *TINY]
    planned = tmp_path / "planned"
    ct("train", *common, f"run_dir={planned}", *WSD)
    stable = tmp_path / "stable"  # the stable stage: constant LR, no end planned yet
    ct("train", *common, f"run_dir={stable}", "schedule.name=constant", "schedule.warmup_steps=1",
       "trainer.max_steps=4")
    branch = tmp_path / "branch"
    shutil.copytree(stable, branch)
    ct("train", *common, f"run_dir={branch}", *WSD)

    assert [e["step"] for e in events(branch) if e["event"] == "resume"] == [4]
    want, got = lrs(planned), lrs(branch)
    assert got == pytest.approx(want, rel=1e-12)
    assert want[5] == want[4] == want[1] and want[6] < want[5]  # stable, then a real decay (from step 5)
    losses, expected = train_losses(branch), train_losses(planned)
    assert sorted(losses) == list(range(1, 7))
    for step in (5, 6):
        assert losses[step] == pytest.approx(expected[step], rel=1e-6), step

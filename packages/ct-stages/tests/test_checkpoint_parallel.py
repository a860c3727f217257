"""Checkpoints verified in parallel: each rank hashes the files it wrote at a save, and checks a
share of the files at a resume. Against independent references: a manifest computed here with
hashlib, the writer read off each file name by hand, a damaged file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def hand_manifest(step_dir: Path) -> dict:
    """Every file but meta.json: size and sha256, computed without the code under test."""
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = Path(root) / name
            rel = str(path.relative_to(step_dir))
            if rel != "meta.json":
                out[rel] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return out


def relative(paths: list[str], step_dir_name: str) -> set[str]:
    """The recorded absolute paths under a step's directory (final or .tmp-), relative to it."""
    out = set()
    for p in paths:
        parts = Path(p).parts
        i = next(k for k, part in enumerate(parts) if part.endswith(step_dir_name))
        out.add(str(Path(*parts[i + 1:])))
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "dist_checkpoint_checks.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.dist
@pytest.mark.slow
def test_each_rank_hashes_the_files_it_wrote_and_meta_lists_every_file(two_ranks):
    out, ranks = two_ranks
    for step, phase in ((1, "save_sync"), (2, "save_async")):
        name = f"step_{step:08d}"
        step_dir = out / "checkpoints" / name
        files = json.loads((step_dir / "meta.json").read_text())["files"]
        if step == 2:  # damaged afterwards by the script: compare with step 1's layout instead
            assert set(files) == set(json.loads((out / "checkpoints" / "step_00000001" / "meta.json").read_text())["files"])
        else:
            assert files == hand_manifest(step_dir)
        # Who wrote what, by hand: DCP's rank files __{r}_{n}.distcp, its coordinator's .metadata
        # (rank 0), and each rank's trainer state.
        want0 = {n for n in files if n.startswith("engine/__0_") or n in ("engine/.metadata", "trainer_rank0.pt")}
        want1 = {n for n in files if n.startswith("engine/__1_") or n == "trainer_rank1.pt"}
        assert want0 | want1 == set(files) and want1  # rank 1 wrote data of its own
        got0, got1 = (relative(r[phase], name) for r in ranks)
        assert (got0, got1) == (want0, want1), phase


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_verify_disjoint_shares_and_all_skip_a_file_one_of_them_found_damaged(two_ranks):
    out, (r0, r1) = two_ranks
    intact = set(json.loads((out / "checkpoints" / "step_00000001" / "meta.json").read_text())["files"])
    v0, v1 = (relative(r["verify_intact"], "step_00000002") for r in (r0, r1))
    assert not v0 & v1 and v0 | v1 == intact and v0 and v1  # every file once, both ranks work
    assert r0["verified_intact"] == r1["verified_intact"] == "step_00000002"
    # A byte flipped in a file only rank 1 checks: rank 0 skips the checkpoint all the same.
    victim = r0["victim"]
    assert victim in r1["verify_damaged"] and victim not in r0["verify_damaged"]
    assert r0["verified_damaged"] == r1["verified_damaged"] == "step_00000001"
    assert any(victim in w and "checksum differs" in w for w in r0["warnings"])


MEGATRON_RUNNER = HERE.parents[1] / "ct-parallel" / "tests" / "megatron_cpu_run.py"


@pytest.mark.dist
@pytest.mark.slow
def test_a_megatron_async_checkpoint_holds_the_state_at_save_time_and_each_rank_hashes_its_files(tmp_path):
    """megatron TP=2 under the CPU shim (dist_megatron_async_checks.py): the writer is held until
    the loop has changed weights and optimizer state; the checkpoint still holds the save-time
    state (a fresh engine loaded from it takes the next step with the original's loss), it counts
    only once written, and each rank hashed the files it wrote (the coordinator's metadata on rank 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(MEGATRON_RUNNER), str(HERE / "dist_megatron_async_checks.py"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(MEGATRON_RUNNER.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["polled_while_held"] and r1["polled_while_held"]  # nothing counted before the write
    assert r0["waited"] == r0["final"] == r1["waited"]
    assert r0["weights_equal_at_save"]
    assert r0["loss_after_load"] == r0["loss_after_save"] and r1["loss_after_load"] == r1["loss_after_save"]
    step_dir = Path(r0["final"])
    files = json.loads((step_dir / "meta.json").read_text())["files"]
    assert files == hand_manifest(step_dir)
    # megatron's torch_dist writer: __{r}_{n}.distcp per rank; .metadata and metadata.json by rank 0
    want0 = {n for n in files if n.startswith("engine/__0_")} | {"engine/.metadata", "engine/metadata.json",
                                                                 "trainer_rank0.pt"}
    want1 = {n for n in files if n.startswith("engine/__1_")} | {"trainer_rank1.pt"}
    assert want0 | want1 == set(files)
    assert (relative(r0["hashed_at_save"], "step_00000001"), relative(r1["hashed_at_save"], "step_00000001")) \
        == (want0, want1)

"""ct-plan against the measured peak of real ct-train steps on CPU (tools/bench_plan_vs_measured.py,
whose full table is in docs/ct-parallel.md): a 2-layer model at seq 128, three configurations, the
ratio predicted / measured per process. The reference is PyTorch's CPU allocator's own running
total of live bytes (c10), not ct-plan's arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# The forward's peak with gradient accumulation (selective checkpointing, one process), the
# optimizer step's peak (full checkpointing, one microbatch a step), FSDP2 x 2 over gloo.
CONFIGS = ["single:2:selective", "single:1:full::1", "fsdp2:1:none"]


def test_ct_plan_predicts_the_measured_peak():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench_plan_vs_measured.py"), "--smoke", "--json",
                           "--configs", *CONFIGS], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert sorted(rows) == sorted(CONFIGS)
    for name, row in rows.items():
        assert 0.8 <= row["ratio"] <= 1.25, (name, row["ratio"])  # the band
    # One process: every term is counted, the prediction is within a few percent.
    for name in ("single:2:selective", "single:1:full::1"):
        assert rows[name]["ratio"] == pytest.approx(1.0, abs=0.03), (name, rows[name]["ratio"])
    assert rows["single:2:selective"]["predicted_moment"] == "forward"
    assert rows["single:1:full::1"]["predicted_moment"] == "optimizer step"

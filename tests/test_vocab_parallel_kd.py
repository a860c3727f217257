"""KD on vocabulary-split logits (what the megatron engine runs under tensor parallelism) equals
KD on the full logits: 2 gloo processes, each holding half the student's vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.dist
def test_kd_on_vocab_shards_equals_kd_on_full_logits(tmp_path):
    out = tmp_path / "kd.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "dist_vocab_parallel_kd.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", **os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == 3 * 3 * 2  # kinds x (full logits, top-k of them, cached top-k) x (no CE, CE)
    for name, r in results.items():
        assert r["loss"] < 1e-12 and r["grad"] < 1e-12, (name, r)  # float64: only rounding differs

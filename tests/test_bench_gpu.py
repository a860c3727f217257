"""tools/bench_gpu.py --smoke runs every row of every workload on CPU (the megatron row under the
test-only CPU shim), so the script a GPU session runs is known to work before a device is lent."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from cli_support import ROOT

SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"


def _bench(tmp_path, *args: str, runner: tuple[str, ...] = ()) -> tuple[list[dict], subprocess.CompletedProcess]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, *runner, str(ROOT / "tools" / "bench_gpu.py"), "--smoke", "--json",
                           str(out), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())["results"], proc


def _ran(row: dict) -> bool:
    return (row["status"] == "ok" and math.isfinite(row["tokens_per_s"]) and row["tokens_per_s"] > 0
            and row["memory_gib"] > 0 and len(row["step_s"]) == 1)


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_row(tmp_path):
    rows, proc = _bench(tmp_path)
    names = [(r["workload"], r["row"]) for r in rows]
    assert names == [("smoke seq 32 x 2", row) for row in
                     ("a hf", "b bf16", "c compile", "d fp8", "e sac-max", "f megatron")] + \
                    [("smoke seq 64 x 1, 4 docs/row", "b bf16"), ("smoke seq 64 x 1, 4 docs/row", "e sac-max")]
    for r in rows:
        if r["row"] == "f megatron":
            assert r["status"] == "skipped (no CUDA)", r
        else:
            assert _ran(r), r
    # Row e ran at the doubled micro-batch (the smoke search stops at x2).
    assert {r["micro"] for r in rows if r["row"] == "e sac-max"} == {4, 2}
    assert "FP8 on CPU is emulated" in proc.stderr
    table = proc.stdout.split("80G", 1)[1]
    assert table.count("smoke seq") == len(rows)


@pytest.mark.slow
def test_bench_gpu_megatron_row_runs_under_the_cpu_shim(tmp_path):
    rows, _ = _bench(tmp_path, "--rows", "f", runner=(str(SHIM_RUNNER),))
    assert [(r["row"], r["status"]) for r in rows] == [("f megatron", "ok")] and _ran(rows[0])

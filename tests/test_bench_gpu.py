"""tools/bench_gpu.py --smoke runs on CPU and prints a row for every precision x AC x compile cell."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from cli_support import ROOT


def test_bench_gpu_smoke_prints_every_cell(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_gpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    cells = [(r["cell"]["precision"], r["cell"]["ac"], r["cell"]["compile"]) for r in rows]
    want = [(p, ac, False) for p in ("fp32", "bf16", "fp8") for ac in ("none", "selective", "full")]
    want += [(p, "none", True) for p in ("fp32", "bf16", "fp8")]
    assert cells == want
    table = proc.stdout.split("peak GiB", 1)[1]
    for p, ac, compiled in want:
        assert f"{p:<5} ac={ac:<9} compile={'on' if compiled else 'off'}" in table
    # The plain cells always run (AC/compile cells need ct_precision's AC/compile configs).
    for r in rows:
        if r["cell"]["ac"] == "none" and not r["cell"]["compile"]:
            assert r["status"] == "ok" and math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, r
            assert r["memory_gib"] > 0, r
        else:
            assert r["status"] in ("ok", "n/a (not built)", "skipped (smoke)"), r
    assert "FP8 on CPU is emulated" in proc.stderr

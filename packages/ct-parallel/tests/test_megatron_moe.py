"""The DeepSeek-V3 architecture (MLA + MoE) on the megatron engine, against single-process ct-model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402

# megatron layouts of dist_megatron_moe_checks.py this test runs
LAYOUTS = ("tp2_sp", "pp2", "ep2", "tp2_dense_mla")


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_mla_moe_layouts_match_single_process(tmp_path):
    """deepseek_v3_tiny's structure (MLA, a dense first block, shared + 8 routed experts in 4
    groups, sigmoid routing, expert bias updated every step) at TP=2+SP, PP=2 and EP=2 (the alltoall
    dispatcher over gloo), and dense MLA at TP=2 without SP: losses over 3 AdamW steps, step-0
    gradients and global grad norm, weights after the steps (fp32, relative <= 1e-5 / 3e-5) and
    every router's expert bias after each update (equal to 1e-5; the reference bias must have moved);
    the EP=2 checkpoint reloads at EP=1 and PP=2. Unsupported MoE/MLA settings fail naming the field."""
    out = tmp_path / "moe.json"
    lib.torchrun("dist_megatron_moe_checks.py", str(out), *LAYOUTS, shim=True, timeout=480)
    results = json.loads(out.read_text())
    assert results["bias_moved"] > 0
    for name in LAYOUTS:
        r = results[name]
        assert r["loss"] <= lib.TOL and r["grad"] <= lib.TOL and r["bias"] <= lib.TOL, (name, r)
        assert r["norm"] <= lib.TOL, (name, r)
        assert r.get("load_figures", 0.0) <= 1e-6, (name, r)  # logged load shares and bias range  # the step-0 global grad norm (experts counted once)
        assert r["param"] <= lib.PARAM_TOL, (name, r)
    # The EP=2 checkpoint reloads at EP=1 (DP=2) and PP=2: equal weights (expert bias included,
    # exactly) and loss.
    for other in ("dp2", "pp2"):
        assert results[f"reload_ep2_{other}"]["loss"] <= lib.TOL
    for field, message in results["errors"].items():
        assert field in message, (field, message)

"""FSDP2 (and DDP) on the MoE model: experts sharded as ordinary parameters, equal to one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402


@pytest.mark.dist
@pytest.mark.slow
def test_moe_fsdp2_and_ddp_match_single_process_including_expert_bias(tmp_path):
    out = tmp_path / "moe.json"
    lib.torchrun("dist_moe_native_checks.py", str(out))
    results = json.loads(out.read_text())
    for strategy in ("ddp", "fsdp2"):
        assert results[strategy]["loss"] <= lib.TOL, results[strategy]
        assert results[strategy]["param"] <= lib.PARAM_TOL, results[strategy]

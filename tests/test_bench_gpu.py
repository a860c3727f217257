"""tools/bench_gpu.py --smoke runs every row of every workload on CPU (the megatron row under the
test-only CPU shim), so the script a GPU session runs is known to work before a device is lent;
a row frees its model without waiting for gc; a broken row reports its error and the others run."""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import subprocess
import sys
import weakref

import pytest
import torch

from cli_support import ROOT

SHIM_RUNNER = ROOT / "packages" / "ct-parallel" / "tests" / "megatron_cpu_run.py"

# The smoke model: 2 layers, hidden 64, 4 heads of 16, 2 query groups, ffn 128, vocab 256.
SMOKE_MATMUL = 6 * (2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128) + 256 * 64)  # per token
SMOKE_PAIR = 6 * 2 * 4 * (16 + 16)  # one query x one key, forward + backward


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "tools" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
    # MFU counts attention per document, the causal half; "MFU TxT" the full square of the row:
    # their ratio is the ratio of the FLOPs per token, whatever the tokens/s and the peak.
    one_doc = (SMOKE_MATMUL + SMOKE_PAIR * 32) / (SMOKE_MATMUL + SMOKE_PAIR * 32 / 2)
    four_docs = (SMOKE_MATMUL + SMOKE_PAIR * 64) / (SMOKE_MATMUL + SMOKE_PAIR * 4 * 16**2 / 2 / 64)
    for r in rows:
        if r["status"] == "ok":
            expected = four_docs if "4 docs" in r["workload"] else one_doc
            assert r["mfu_full_attention"] / r["mfu"] == pytest.approx(expected), r


@pytest.mark.slow
def test_bench_gpu_megatron_row_runs_under_the_cpu_shim(tmp_path):
    rows, _ = _bench(tmp_path, "--rows", "f", runner=(str(SHIM_RUNNER),))
    assert [(r["row"], r["status"]) for r in rows] == [("f megatron", "ok")] and _ran(rows[0])


def test_a_rows_step_frees_its_model_without_gc():
    """The step closures hold the model and optimizer and nothing holds the closures: dropping
    one frees them at once (a loss stored on the function made a cycle that only gc broke)."""
    bench = _load_bench()
    workload, device = bench.Workload("smoke", 32, 2), torch.device("cpu")
    config = bench.model_config(workload)
    gc.collect()
    gc.disable()
    try:
        for row in ("a hf", "b bf16"):
            batch, _ = bench.make_batch(config, workload, 2, device)
            step = (bench.hf_step(config, batch, device) if row == "a hf"
                    else bench.ct_step(config, batch, row, True, device))
            _, loss = bench.timed_steps(step, 1, device)
            assert math.isfinite(loss)
            held = [weakref.ref(cell.cell_contents) for cell in step.__closure__
                    if isinstance(cell.cell_contents, torch.nn.Module) or hasattr(cell.cell_contents, "optimizer")]
            assert held, row
            del step
            assert all(ref() is None for ref in held), row
    finally:
        gc.enable()


def test_a_broken_row_reports_its_error_and_the_others_run(tmp_path, monkeypatch, capsys):
    bench = _load_bench()
    real = bench.ct_step

    def broken(config, batch, row, smoke, device):
        if row == "b bf16":
            raise ValueError("row b broke here\nand the second line is not shown")
        return real(config, batch, row, smoke, device)

    monkeypatch.setattr(bench, "ct_step", broken)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--rows", "b,d", "--json", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    assert [(r["row"], r["status"]) for r in rows] == [
        ("b bf16", "error: ValueError: row b broke here"), ("d fp8", "ok"),
        ("b bf16", "error: ValueError: row b broke here")]
    assert _ran(rows[1])
    table = capsys.readouterr().out.split("80G", 1)[1]
    assert table.count("b bf16: error: ValueError: row b broke here") == 2

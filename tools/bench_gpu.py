"""Precision x activation checkpointing x compile on one device: tokens/s, MFU and peak memory of
the same model and batch, one table (ratios against the bf16 / AC none / eager cell of this run).

    python tools/bench_gpu.py            # one GPU: mobilellm_950m at seq 4096 (2048 under 80 GiB), < 8 min
    python tools/bench_gpu.py --smoke    # CPU, seconds: tiny model, 2 steps per cell (CI keeps it alive)

Cells: precision fp32 | bf16 | fp8 (configs/precision/, fp8 = torchao tensorwise; emulated on
CPU) x AC none | selective | full, eager; plus torch.compile with AC none for each precision.
Each cell builds a fresh model and engine (ct_parallel.build_engine, native single process), runs
one warm-up step and ``--steps`` timed AdamW steps on one fixed random batch. MFU uses
ct_stages.metrics (flops_per_token / the device's data-sheet bf16 peak, so an fp32 cell's MFU is
against the bf16 peak). Peak memory: torch.cuda.max_memory_allocated per cell (CPU: the process's
max RSS so far, which only grows). A cell that runs out of memory is reported, not fatal.

Activation checkpointing and compile come from ct_precision (ActivationCheckpointConfig,
CompileConfig) through build_engine's ``activation_checkpointing=`` / ``compile=`` keywords.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from ct_precision import ActivationCheckpointConfig, CompileConfig

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("fp32", "bf16", "fp8")
AC_MODES = ("none", "selective", "full")
# Rough seconds per cell on an H200 for the estimate: build + warm-up + steps; compile adds its trace.
EST_EAGER_S, EST_COMPILE_S = 15.0, 60.0



@dataclass(frozen=True)
class Cell:
    precision: str
    ac: str = "none"
    compile: bool = False

    @property
    def name(self) -> str:
        return f"{self.precision:<5} ac={self.ac:<9} compile={'on' if self.compile else 'off'}"


@dataclass
class Result:
    cell: Cell
    status: str = "ok"
    tokens_per_s: float = float("nan")
    mfu: float | None = None
    memory_gib: float = float("nan")
    step_s: list[float] = field(default_factory=list)


def cells() -> list[Cell]:
    grid = [Cell(p, ac) for p in PRECISIONS for ac in AC_MODES]
    return grid + [Cell(p, "none", compile=True) for p in PRECISIONS]


def precision_config(name: str, smoke: bool):
    from ct_precision import PrecisionConfig

    values = yaml.safe_load((ROOT / "configs" / "precision" / f"{name}.yaml").read_text())
    config = PrecisionConfig.from_dict(values)
    # The tiny model's matmuls are all below the preset's size rule: convert them anyway.
    return replace(config, fp8_min_matmul_elements=0) if smoke and config.fp8 else config


def engine_options(cell: Cell) -> dict:
    """build_engine keywords for AC/compile."""
    return {"activation_checkpointing": ActivationCheckpointConfig(mode=cell.ac),
            "compile": CompileConfig(enabled=cell.compile)}


def model_config(smoke: bool, device: torch.device, seq: int | None):
    from ct_model import presets

    if smoke:
        config = presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=4,
                             num_query_groups=2, kv_channels=16, ffn_hidden_size=128, vocab_size=256,
                             max_position_embeddings=64)
        return config, seq or 32, 2
    if seq is None:  # 4096 where the memory allows the fp32 no-AC cell, else 2048
        big = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory >= 80 * 2**30
        seq = 4096 if big else 2048
    return presets.get("mobilellm_950m"), seq, 1


def make_batch(config, micro: int, seq: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (micro, seq + 1), generator=g)
    pos = torch.arange(seq).expand(micro, seq).contiguous()
    return [{"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device), "position_ids": pos.to(device),
             "document_ids": torch.zeros(micro, seq, dtype=torch.long, device=device)}]


def make_loss_fn():
    """The pretraining stage's own loss: chunked CE from the hidden states (loss.chunk_tokens=1024,
    the fused kernel where installed), so no cell holds [tokens x vocab] logits."""
    from ct_stages.stages import LossConfig, make_ce_loss

    return make_ce_loss(LossConfig())


def run_cell(cell: Cell, args, device: torch.device, throughput) -> Result:
    from ct_model import build_model
    from ct_parallel import DistributedConfig, build_engine
    from ct_stages.metrics import memory_gib

    options = engine_options(cell)
    if cell.compile and args.smoke:
        return Result(cell, status="skipped (smoke)")  # inductor on CPU: minutes, not seconds
    config, seq, micro = model_config(args.smoke, device, args.seq)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    result = Result(cell)
    try:
        model = build_model(config, seed=0).to(device)
        engine = build_engine(model, DistributedConfig(), precision=precision_config(cell.precision, args.smoke),
                              **options)
        engine.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-4))
        batch = make_batch(config, micro, seq, device)
        for step in range(1 + args.steps):  # step 0: warm-up (compile, allocator, caches)
            start = time.perf_counter()
            out = engine.forward_backward(batch, make_loss_fn())
            engine.optimizer_step()
            engine.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step:
                result.step_s.append(time.perf_counter() - start)
        if not math.isfinite(out.loss):
            result.status = f"loss {out.loss}"
        seconds = sorted(result.step_s)[len(result.step_s) // 2]
        record = throughput(config, seq).measure(out.input_tokens, seconds)
        result.tokens_per_s, result.mfu = record["tokens_per_s"], record["mfu"]
        result.memory_gib = memory_gib(device)
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
    finally:
        engine = model = None  # noqa: F841 (free the cell before the next one)
    return result


def table(results: list[Result]) -> str:
    base = next((r for r in results if r.cell == Cell("bf16") and r.status == "ok"), None)
    lines = [f"{'cell':<34} {'status':<16} {'tokens/s':>11} {'vs bf16':>8} {'MFU':>7} {'peak GiB':>9}"]
    for r in results:
        ratio = r.tokens_per_s / base.tokens_per_s if base and r.status == "ok" else float("nan")
        mfu = f"{100 * r.mfu:6.1f}%" if r.mfu is not None else "    n/a"
        lines.append(f"{r.cell.name:<34} {r.status:<16} {r.tokens_per_s:>11.1f} {ratio:>8.2f} {mfu:>7} "
                     f"{r.memory_gib:>9.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps per cell (seconds)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 3; smoke 1)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 4096 / 2048; smoke 32)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.smoke else 3)
    from ct_stages.metrics import PeakFlops, Throughput, flops_per_token

    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        print("bench_gpu: no CUDA device; run with --smoke on CPU", file=sys.stderr)
        return 2
    peak = PeakFlops.for_device(device)

    def throughput(config, seq):
        return Throughput(flops_per_token(config, seq), peak)

    grid = cells()
    compiled = sum(c.compile for c in grid)
    if not args.smoke:
        estimate = (len(grid) - compiled) * EST_EAGER_S + compiled * EST_COMPILE_S
        print(f"bench_gpu: {len(grid)} cells, about {estimate / 60:.1f} min on one H200-class GPU", flush=True)
    config, seq, micro = model_config(args.smoke, device, args.seq)
    print(f"model {config.name} seq {seq} micro-batch {micro}, {args.steps} timed steps per cell, "
          f"device {device} (peak {peak.value / 1e12:.1f} TFLOP/s, {peak.source})", flush=True)
    results = []
    for cell in grid:
        start = time.perf_counter()
        results.append(run_cell(cell, args, device, throughput))
        print(f"  {cell.name}: {results[-1].status} in {time.perf_counter() - start:.1f} s", flush=True)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([{**r.__dict__, "cell": r.cell.__dict__} for r in results], indent=1))
    return 0 if all(r.status == "ok" or r.status.startswith(("n/a", "skipped", "OOM")) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

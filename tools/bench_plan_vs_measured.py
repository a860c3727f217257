"""ct-plan's per-process peak against the measured peak of real ct-train steps, on CPU.

For each configuration, the same ct-train overrides go two ways:

- planned: ct-plan's own composition and arithmetic (ct_cli.plan.plan_inputs with ``--device cpu``,
  then ct_parallel.plan.plan): the per-process total, and the moment it predicts for the peak;
- measured: a fresh process (single) or two under torchrun (FSDP2, gloo) composes the same
  RunConfig, builds the run as ct-train's setup does (ct_stages.run.build_phase_model on meta,
  ct_parallel.build_engine materialising each rank's shards, ct-train's optimizer and the phase's
  loss) and runs Trainer steps (zero_grad, engine.forward_backward over the step's microbatches,
  clip, optimizer step) on packed rows (four documents per row, position ids restarting, as the
  loader packs them): one warm-up step (AdamW's state, FSDP2's lazy init), then the measured one.

What "measured" is: the peak, during the measured step, of the bytes PyTorch's CPU allocator has
handed out and not taken back, in each process (the larger rank's is printed). c10 keeps that
running total itself when FLAGS_caffe2_report_cpu_memory_usage is set (here through ctypes, before
anything is allocated) and logs it after every allocation and free, from whichever thread, which
is what ct-plan counts: tensors. Not RSS (VmHWM): that adds malloc's retained and fragmented pages
and the process's own baseline (interpreter, libraries, gloo), none of which ct-plan models. Not a
TorchDispatchMode over live storages: it sees op outputs but not the temporaries inside a kernel
(logsumexp's exp(x - max), add_'s upcast of a bf16 product), nor FSDP2's storage resizes. Not
torch.profiler's memory events: they are recorded per thread, gloo's worker threads free some
collective buffers unseen, and the running sum drifts (35-100 MB a step under FSDP2, measured).

    OMP_NUM_THREADS=1 uv run python tools/bench_plan_vs_measured.py            # the table (~15 min)
    uv run python tools/bench_plan_vs_measured.py --configs single:1:none fsdp2:2:full
    uv run python tools/bench_plan_vs_measured.py --smoke                        # tiny shape, seconds

A configuration is STRATEGY:MICRO:MODE[:PRECISION[:MICROBATCHES]] (precision fp32 by default, as
ct-train's auto resolves on a CPU; 2 microbatches per step by default, as the recipe accumulates).
Exits 1 when a ratio predicted / measured falls outside [0.8, 1.25].
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BAND = (0.8, 1.25)
# micro 1/2/4 without checkpointing, single and FSDP2 x 2; selective and full at micro 2; the
# optimizer-step peak (one microbatch per step, full checkpointing); bf16 (autocast, FSDP2's policy).
DEFAULT_CONFIGS = [
    "single:1:none", "single:2:none", "single:4:none", "single:2:selective", "single:2:full",
    "single:1:full::1", "single:1:none:bf16",
    "fsdp2:1:none", "fsdp2:2:none", "fsdp2:4:none", "fsdp2:2:selective", "fsdp2:2:full",
    "fsdp2:1:none:bf16",
]
SMOKE_OVERRIDES = ["model=mobilellm_tiny", "model.num_layers=2", "model.vocab_size=2048"]
WORLD = {"single": 1, "fsdp2": 2, "ddp": 2}


# ------------------------------------------------------------------------------ configurations


def parse_config(text: str) -> dict:
    parts = (text.split(":") + ["", ""])[:5]
    strategy, micro, mode, precision, microbatches = parts
    if strategy not in WORLD or mode not in ("none", "selective", "full"):
        raise SystemExit(f"bad configuration {text!r}: STRATEGY:MICRO:MODE[:PRECISION[:MICROBATCHES]]")
    return {"name": text, "strategy": strategy, "micro": int(micro), "mode": mode,
            "precision": precision or "fp32", "microbatches": int(microbatches or 2)}


def overrides_for(cfg: dict, args: argparse.Namespace) -> list[str]:
    """The ct-train overrides of one configuration (size=cpu: ct-plan would default to the recipe)."""
    world = WORLD[cfg["strategy"]]
    model = SMOKE_OVERRIDES if args.smoke else [f"model={args.model}"]
    return ["size=cpu", *model, f"seq_len={args.seq}", f"distributed={cfg['strategy']}",
            f"precision={cfg['precision']}", f"activation_checkpointing.mode={cfg['mode']}",
            f"trainer.micro_batch_size={cfg['micro']}",
            f"trainer.global_batch_size={cfg['micro'] * world * cfg['microbatches']}"]


def predicted(overrides: list[str], world: int) -> dict:
    """ct-plan's answer for these overrides on a CPU, through its own composition."""
    from ct_cli import plan as plan_cli
    from ct_parallel.plan import plan

    args = plan_cli.parse_args(["--device", "cpu", "--world-size", str(world), *overrides])
    _, model, dist, world, workload_for, extras_for = plan_cli.plan_inputs(args, plan_cli.config_dir(None))
    stage = plan(model, dist, world, workload_for(world), extras=extras_for(world)).worst
    return {"bytes": stage.total_bytes, "moment": stage.peak_moment}


# -------------------------------------------------------------------------------------- worker


def _c10_flags():
    import torch

    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return (ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_report_cpu_memory_usage"),
            ctypes.c_int.in_dll(lib, "FLAGS_caffe2_log_level"))


def packed_batch(rows: int, seq: int, vocab: int, seed: int) -> dict:
    """Rows of four documents each (random cut points), as ct_data's packer lays them out."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq + 1), generator=g)
    docs = torch.zeros(rows, seq, dtype=torch.long)
    pos = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        cuts = [0, *sorted(torch.randperm(seq - 1, generator=g)[:3].add(1).tolist()), seq]
        for d, (a, b) in enumerate(zip(cuts, cuts[1:])):
            docs[r, a:b], pos[r, a:b] = d, torch.arange(b - a)
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "position_ids": pos, "document_ids": docs}


def worker(overrides: list[str], out_dir: Path) -> None:
    """One process of a measured run: its peak allocator total during the measured step -> JSON."""
    rank = int(os.environ.get("RANK", "0"))
    log_path = out_dir / f"alloc_{rank}.log"
    # c10 logs through stderr: send it to a file before anything is allocated.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    saved_stderr = os.dup(2)
    os.dup2(log_fd, 2)
    report, level = _c10_flags()
    level.value, report.value = 0, True
    try:
        _measured_steps(overrides)
    finally:
        report.value = False
        os.dup2(saved_stderr, 2)
    peak = peak_between(log_path, "measured start", "measured end")
    (out_dir / f"result_{rank}.json").write_text(json.dumps({"rank": rank, **peak}))


def _measured_steps(overrides: list[str]) -> None:
    import torch

    from ct_cli.common import config_dir, run_config
    from ct_parallel import build_engine, init_distributed, shutdown_distributed
    from ct_stages.optim import build_optimizer
    from ct_stages.run import build_phase_model, phase_model_config
    from ct_stages import Objective, build_loss

    run = run_config("pretrain_phase1", overrides, config_dir(None))
    info = init_distributed(run.distributed)
    run, _ = run.resolved_for(info.device)
    config = phase_model_config(run, None)
    model, weights = build_phase_model(run, None, config)
    engine = build_engine(model, run.distributed, precision=run.precision,
                          activation_checkpointing=run.activation_checkpointing, compile=run.compile,
                          weights=weights, device=info.device)
    engine.setup_optimizer(lambda named: build_optimizer(named, run.optimizer))
    objective = Objective(build_loss(run.stage, run.loss))
    batch = packed_batch(run.trainer.global_batch_size // info.dp_size, run.seq_len, config.vocab_size, info.rank)

    def step(label: str) -> None:  # what Trainer._train_step does, markers around it
        microbatches = objective.microbatches(batch, run.trainer.micro_batch_size)
        os.write(2, f"@@mark {label} start\n".encode())
        engine.zero_grad()
        engine.forward_backward(microbatches, objective.loss)
        engine.clip_grad_norm(run.optimizer.clip_grad)
        engine.optimizer_step()
        os.write(2, f"@@mark {label} end\n".encode())

    step("warm-up")
    step("measured")
    del torch
    shutdown_distributed(run.distributed)


TOTAL = re.compile(r"C10 (?:alloc|deleted) \d+ bytes, total alloc (\d+) bytes")


def peak_between(log_path: Path, start: str, end: str) -> dict:
    """The largest running total c10 logged between two markers, and the total at the first."""
    total, inside, peak, at_start = 0, False, 0, None
    with open(log_path, errors="replace") as f:
        for line in f:
            if line.startswith("@@mark"):
                label = line[len("@@mark "):].strip()
                if label == start:
                    inside, at_start, peak = True, total, total
                elif label == end:
                    inside = False
                continue
            m = TOTAL.search(line)
            if m:
                total = int(m.group(1))
                if inside:
                    peak = max(peak, total)
    if at_start is None:
        raise RuntimeError(f"no {start!r} marker in {log_path}")
    return {"peak_bytes": peak, "start_bytes": at_start}


def measured(cfg: dict, overrides: list[str], out_dir: Path) -> dict:
    """Run the configuration's worker(s) and return the larger rank's peak."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    script = [str(Path(__file__).resolve()), "--worker", str(out_dir), "--", *overrides]
    world = WORLD[cfg["strategy"]]
    if world == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(29500 + os.getpid() % 1000), *script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{cfg['name']}: the measured run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out_dir / f"result_{r}.json").read_text()) for r in range(world)]
    return max(ranks, key=lambda r: r["peak_bytes"])


# ---------------------------------------------------------------------------------------- main


def compare(configs: list[dict], args: argparse.Namespace) -> list[dict]:
    rows = []
    for cfg in configs:
        overrides = overrides_for(cfg, args)
        with tempfile.TemporaryDirectory(prefix="ct-plan-bench-") as tmp:
            got = measured(cfg, overrides, Path(tmp))
        want = predicted(overrides, WORLD[cfg["strategy"]])
        row = {**cfg, "overrides": overrides, "predicted_bytes": want["bytes"], "predicted_moment": want["moment"],
               "measured_bytes": got["peak_bytes"], "ratio": want["bytes"] / got["peak_bytes"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [f"{'layout':<8}{'micro':>6}{'mb/step':>8}  {'recompute':<10}{'precision':<10}{'predicted MiB':>14}"
             f"{'measured MiB':>14}{'ratio':>7}  peak (ct-plan)"]
    for r in rows:
        layout = "FSDP2x2" if r["strategy"] == "fsdp2" else r["strategy"]
        lines.append(f"{layout:<8}{r['micro']:>6}{r['microbatches']:>8}  {r['mode']:<10}{r['precision']:<10}"
                     f"{r['predicted_bytes'] / mib:>14.0f}{r['measured_bytes'] / mib:>14.0f}{r['ratio']:>7.3f}  "
                     f"{r['predicted_moment']}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilellm_140m")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                   help="STRATEGY:MICRO:MODE[:PRECISION[:MICROBATCHES]] (strategy single, ddp or fsdp2)")
    p.add_argument("--smoke", action="store_true", help="a 2-layer tiny model at seq 128 (seconds per config)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list at the end")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.overrides, Path(args.worker))
        return 0
    if args.smoke:
        args.seq = min(args.seq, 128)
    rows = compare([parse_config(c) for c in args.configs], args)
    shape = "smoke (2-layer tiny)" if args.smoke else args.model
    print(f"\n{shape}, seq {args.seq}, CPU: ct-plan --device cpu per process vs the c10 allocator's peak "
          f"of the measured step (larger rank)")
    print(table(rows))
    if args.json:
        print(json.dumps(rows))
    bad = [r for r in rows if not BAND[0] <= r["ratio"] <= BAND[1]]
    if bad:
        print(f"outside [{BAND[0]}, {BAND[1]}]: {', '.join(r['name'] for r in bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

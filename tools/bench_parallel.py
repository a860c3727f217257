"""Step time of every parallel layout against single-process, same model and global batch.

    python tools/bench_parallel.py [--preset mobilellm_tiny] [--seq 256] [--steps 3]

On a CPU machine the megatron layouts run through the test-only CPU shim
(packages/ct-parallel/tests/megatron_cpu_run.py); on GPUs they run as shipped. Prints one table:
layout, processes, seconds per step (median of --steps after one warm-up), ratio to single.
Single-process runs with as many threads as the machine has cores; each of the 2 ranks gets
cores/2 threads, so the ratio is the overhead of splitting the same hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "packages" / "ct-parallel" / "tests"
NATIVE = {"ddp": dict(strategy="ddp"), "fsdp2": dict(strategy="fsdp2")}
MEGATRON = {
    "megatron_tp2": dict(tensor_model_parallel_size=2),
    "megatron_tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "megatron_pp2": dict(pipeline_model_parallel_size=2),
    "megatron_pp2_interleaved": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                                     pipeline_schedule="interleaved"),
    "megatron_dp2": dict(),
}


def batch(config, n_micro, b, t):
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_micro):
        ids = torch.randint(0, config.vocab_size, (b, t + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                    "position_ids": torch.arange(t).expand(b, t).contiguous(),
                    "document_ids": torch.zeros(b, t, dtype=torch.long)})
    return out


def time_engine(engine, microbatches, steps):
    import torch
    import torch.nn.functional as F

    def loss_fn(mb, logits):
        return F.cross_entropy(logits.flatten(0, 1).float(), mb["labels"].flatten(), reduction="sum")

    engine.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-4))
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        engine.forward_backward(microbatches, loss_fn)
        engine.clip_grad_norm(1.0)
        engine.optimizer_step()
        engine.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def run_layouts(kind, args):
    import torch.distributed as dist

    from ct_model import build_model, presets
    from ct_parallel import DistributedConfig, build_engine, init_distributed

    config = presets.get(args.preset)
    layouts = NATIVE if kind == "native" else MEGATRON
    for name, values in layouts.items():
        dcfg = DistributedConfig(engine="native" if kind == "native" else "megatron", **values)
        info = init_distributed(dcfg)
        engine = build_engine(build_model(config, seed=0), dcfg)
        mbs = batch(config, args.micro, args.mbs, args.seq)
        per = len(mbs) // info.dp_size
        seconds = time_engine(engine, mbs[info.dp_rank * per:(info.dp_rank + 1) * per], args.steps)
        if dist.get_rank() == 0:
            print("RESULT " + json.dumps({"layout": name, "procs": dist.get_world_size(), "seconds": seconds}), flush=True)
        dist.barrier()
    dist.destroy_process_group()


def launch(kind, args):
    threads = max(1, (os.cpu_count() or 2) // 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29733"]
    if kind == "megatron":
        cmd.append(str(TESTS / "megatron_cpu_run.py"))
    cmd += [str(Path(__file__).resolve()), "--worker", kind, "--preset", args.preset, "--seq", str(args.seq),
            "--steps", str(args.steps), "--micro", str(args.micro), "--mbs", str(args.mbs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{kind} workers failed")
    return [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mobilellm_tiny")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro", type=int, default=4, help="microbatches per step (global)")
    p.add_argument("--mbs", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--worker", choices=("native", "megatron"))
    p.add_argument("--skip-megatron", action="store_true")
    args = p.parse_args()
    if args.worker:
        return run_layouts(args.worker, args)

    import torch

    from ct_model import build_model, presets
    from ct_parallel import DistributedConfig, build_engine

    torch.set_num_threads(os.cpu_count() or 2)
    config = presets.get(args.preset)
    single = time_engine(build_engine(build_model(config, seed=0), DistributedConfig()),
                         batch(config, args.micro, args.mbs, args.seq), args.steps)
    rows = [{"layout": "single", "procs": 1, "seconds": single}]
    rows += launch("native", args)
    if not args.skip_megatron:
        rows += launch("megatron", args)
    tokens = args.micro * args.mbs * args.seq
    print(f"model {args.preset}, global batch {args.micro}x{args.mbs}x{args.seq} = {tokens} tokens, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'layout':28s} {'procs':>5s} {'s/step':>8s} {'vs single':>9s}")
    for r in rows:
        print(f"{r['layout']:28s} {r['procs']:5d} {r['seconds']:8.3f} {r['seconds'] / single:8.2f}x")


if __name__ == "__main__":
    main()

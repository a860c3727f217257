"""Time the training loop is blocked per checkpoint: synchronous vs asynchronous writes (CPU).

Runs the product's own loop twice, the same command except ``trainer.async_checkpoint``: ct-train
on the embedded sample data (built once into a temporary directory), one process each, a
checkpoint every ``--every`` steps. The trainer logs, for every checkpoint, ``blocked_s``: the time
the loop spent inside the save (for an async save: waiting for the previous write, then copying the
state to memory; the write itself runs in a background thread). The table gives the median blocked
time per checkpoint, the run's wall time and the mean step time, async against sync in the same run.

    uv run python tools/bench_checkpoint.py                  # mobilellm_140m, seq 512, every 4 steps
    uv run python tools/bench_checkpoint.py --smoke          # tiny model, seconds

``--verify``: rank 0's share of the checkpoint integrity work at 1, 2 and 4 processes (torchrun,
gloo; FSDP2 above one process, so each rank writes its shard). For each world size checkpoints of
mobilellm_140m at vocab 8192 (model and AdamW state, 815 MiB, in the page cache) are saved and
verified with the product's CheckpointManager; rank 0 times its manifest part of the save and its
``latest_verified`` (wall and CPU seconds: on a shared machine the wall time also holds the wait
for a core). The same rank-0 times under the previous scheme are measured on the same files:
rank 0 hashing every file for the manifest alone, and every rank re-hashing the whole checkpoint
at a resume (all at once, as they did). Medians of ``--repeats``.

    uv run python tools/bench_checkpoint.py --verify --repeats 5   # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _sample(out: Path, scale: float) -> None:
    from ct_data import sample

    sample.build(out, seed=0, scale=scale)
    sample.build_tokenizer(out, 8192, split_digits=True)


def _run(run_dir: Path, sample_dir: Path, args, asynchronous: bool) -> dict:
    overrides = [f"run_dir={run_dir}", f"sample_data.dir={sample_dir}", f"sample_data.scale={args.scale}",
                 f"model={args.model}", f"seq_len={args.seq}", f"trainer.max_steps={args.steps}",
                 f"trainer.checkpoint_every={args.every}", "trainer.global_batch_size=1",
                 "trainer.micro_batch_size=1", "trainer.log_every=1", "logging.progress=false",
                 f"trainer.async_checkpoint={'true' if asynchronous else 'false'}"]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "ct_cli.train", "--phase", "pretrain_phase1", *overrides],
                            cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"ct-train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [e for e in events if e["event"] == "checkpoint"]
    complete = [e["step"] for e in events if e["event"] == "checkpoint_complete"]
    if sorted(complete) != sorted(e["step"] for e in saves):
        raise SystemExit(f"not every checkpoint was reported complete: {saves} vs {complete}")
    steps = [e for e in events if e["event"] == "train"]
    step_s = [e["step_time_s"] for e in steps if "step_time_s" in e]
    return {"async": asynchronous, "checkpoints": len(saves),
            "blocked_s": [round(e["blocked_s"], 4) for e in saves],
            "blocked_median_s": statistics.median(e["blocked_s"] for e in saves),
            "wall_s": wall, "step_mean_s": statistics.mean(step_s) if step_s else None,
            "checkpoint_mib": _size_mib(run_dir / "checkpoints")}


def _size_mib(root: Path) -> float:
    newest = sorted(root.glob("step_*"))[-1]
    return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 2**20


def _table(sync: dict, asy: dict) -> str:
    lines = [f"{'mode':<6} {'ckpts':>5} {'blocked s/ckpt':>15} {'x sync':>7} {'wall s':>8} {'x sync':>7} "
             f"{'step s':>7}"]
    for r in (sync, asy):
        step = f"{r['step_mean_s']:>7.3f}" if r["step_mean_s"] is not None else f"{'-':>7}"
        lines.append(f"{'async' if r['async'] else 'sync':<6} {r['checkpoints']:>5} {r['blocked_median_s']:>15.3f} "
                     f"{r['blocked_median_s'] / sync['blocked_median_s']:>7.2f} {r['wall_s']:>8.1f} "
                     f"{r['wall_s'] / sync['wall_s']:>7.2f} {step}")
    return "\n".join(lines)


# -- --verify: rank 0's share of manifest and verification at 1, 2, 4 processes ------------------


def _verify_worker(out: Path, root: Path, preset: str, vocab: int, repeats: int) -> None:
    """Under torchrun: save, then time rank 0's integrity work, new scheme and previous scheme."""
    import torch
    import torch.distributed as dist

    import ct_model
    from ct_parallel import DistributedConfig, build_engine, init_distributed
    from ct_stages import CheckpointManager
    from ct_stages import checkpoint as ckpt

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    dcfg = DistributedConfig(engine="native", strategy="fsdp2" if world > 1 else "single")
    info = init_distributed(dcfg)
    model = ct_model.build_model(ct_model.presets.get(preset, vocab_size=vocab), seed=0)
    engine = build_engine(model, dcfg)
    engine.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3))
    part_s: list[float] = []
    own_part = ckpt._own_part

    def timed_part(*args):
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return own_part(*args)
        finally:
            part_s.append((time.perf_counter() - start, time.thread_time() - cpu))

    ckpt._own_part = timed_part
    manager = CheckpointManager(root, keep_last=1)

    def on_rank0(fn) -> tuple[float, float]:
        """Every rank starts together; this rank's wall and CPU (this thread) seconds for fn."""
        dist.barrier() if dist.is_initialized() else None
        start, cpu = time.perf_counter(), time.thread_time()
        fn()
        took = (time.perf_counter() - start, time.thread_time() - cpu)
        dist.barrier() if dist.is_initialized() else None
        return took

    times: dict[str, list[tuple[float, float]]] = {"save_part": [], "verify": [], "old_manifest": [],
                                                   "old_verify": []}
    for step in range(1, repeats + 1):
        manager.save(step, engine, {"step": step})
        times["save_part"].append(part_s[-1])
        path = manager.latest()
        times["verify"].append(on_rank0(lambda: manager.latest_verified()))
        times["old_manifest"].append(on_rank0(lambda: ckpt.manifest(path) if info.rank == 0 else None))
        times["old_verify"].append(on_rank0(lambda: ckpt.verify(path)))  # all files, every rank
    files = json.loads((path / "meta.json").read_text())["files"]
    if info.rank == 0:
        mine = ckpt.shares(files, world)[0]
        out.write_text(json.dumps({
            "world": world, "files": len(files), "mib": sum(f["size"] for f in files.values()) / 2**20,
            "rank0_verify_mib": sum(files[n]["size"] for n in mine) / 2**20,
            "rank0_save_mib": sum(f["size"] for n, f in files.items() if ckpt.writer_of(n) == 0) / 2**20,
            **{k: statistics.median(t[0] for t in v) for k, v in times.items()},
            **{f"{k}_cpu": statistics.median(t[1] for t in v) for k, v in times.items()}}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _verify_bench(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ct-bench-verify-") as tmp:
        for world in args.worlds:
            out = Path(tmp) / f"w{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   __file__, "--verify-worker", str(out), "--ckpt-root", str(Path(tmp) / f"ckpt{world}"),
                   "--preset", args.preset, "--vocab", str(args.vocab), "--repeats", str(args.repeats)]
            env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
            result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
            if result.returncode != 0:
                raise SystemExit(f"{world} processes failed ({result.returncode}):\n{result.stderr[-3000:]}")
            rows.append(json.loads(out.read_text()))
            print(json.dumps(rows[-1]), flush=True)
    print(f"{args.preset} at vocab {args.vocab}: {rows[0]['mib']:.0f} MiB per checkpoint; rank 0's seconds, "
          f"median of {args.repeats}")
    print("procs | files | rank-0 MiB hashed (save / verify) | save: manifest, wall (CPU) | before | "
          "resume: verify, wall (CPU) | before")
    for r in rows:
        print(f"{r['world']} | {r['files']} | {r['rank0_save_mib']:.0f} / {r['rank0_verify_mib']:.0f} | "
              f"{r['save_part']:.2f} ({r['save_part_cpu']:.2f}) | {r['old_manifest']:.2f} ({r['old_manifest_cpu']:.2f}) | "
              f"{r['verify']:.2f} ({r['verify_cpu']:.2f}) | {r['old_verify']:.2f} ({r['old_verify_cpu']:.2f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilellm_140m")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.1, help="sample data scale")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps (seconds), to check the tool runs")
    p.add_argument("--verify", action="store_true", help="rank 0's manifest and verification time at 1, 2, 4 processes")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--preset", default="mobilellm_140m")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--verify-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ckpt-root", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.verify_worker:
        return _verify_worker(args.verify_worker, args.ckpt_root, args.preset, args.vocab, args.repeats)
    if args.verify:
        if args.smoke:
            args.preset, args.vocab, args.repeats = "mobilellm_tiny", 256, 1
        return _verify_bench(args)
    if args.smoke:
        args.model, args.seq, args.steps, args.every = "mobilellm_tiny", 64, 4, 2
    with tempfile.TemporaryDirectory(prefix="ct-bench-ckpt-") as tmp:
        tmp = Path(tmp)
        _sample(tmp / "sample", args.scale)
        sync = _run(tmp / "sync", tmp / "sample", args, asynchronous=False)
        print(json.dumps(sync), flush=True)
        asy = _run(tmp / "async", tmp / "sample", args, asynchronous=True)
        print(json.dumps(asy), flush=True)
    print(f"{args.model}, seq {args.seq}, {args.steps} steps, a checkpoint every {args.every} "
          f"(and at the end), {sync['checkpoint_mib']:.0f} MiB each (model + AdamW + trainer state)")
    print(_table(sync, asy))


if __name__ == "__main__":
    main()

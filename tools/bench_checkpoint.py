"""Time the training loop is blocked per checkpoint: synchronous vs asynchronous writes (CPU).

Runs the product's own loop twice, the same command except ``trainer.async_checkpoint``: ct-train
on the embedded sample data (built once into a temporary directory), one process each, a
checkpoint every ``--every`` steps. The trainer logs, for every checkpoint, ``blocked_s``: the time
the loop spent inside the save (for an async save: waiting for the previous write, then copying the
state to memory; the write itself runs in a background thread). The table gives the median blocked
time per checkpoint, the run's wall time and the mean step time, async against sync in the same run.

    uv run python tools/bench_checkpoint.py                  # mobilellm_140m, seq 512, every 4 steps
    uv run python tools/bench_checkpoint.py --smoke          # tiny model, seconds
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilellm_140m")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--scale", type=float, default=0.1, help="sample data scale")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few steps (seconds), to check the tool runs")
    args = p.parse_args()
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

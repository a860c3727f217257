"""Step time of pretraining vs mid-training with an online teacher vs with a cached teacher.

    uv run python tools/bench_midtrain.py [--steps 20] [--seq-len 256] [--batch 16] [--top-k 64]

Same model (mobilellm_tiny student, a teacher of the same shape), same batches, one process, run
one after the other in this command; the median step time of each (first 3 steps excluded) and the
ratios to pretraining are printed. The cached run's one-off cache write is reported separately.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import ct_model
from ct_cli.common import compose, config_dir
from ct_stages.run import run_phase


def median_step_time(run_dir: Path, skip: int = 3) -> float:
    times = [json.loads(line)["step_time_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    return statistics.median(times[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = root / "teacher"
        ct_model.hf.save_hf(ct_model.build_model(ct_model.presets.get("mobilellm_tiny"), seed=1), teacher)
        common = [f"sample_data.dir={root / 'sample'}", f"trainer.max_steps={args.steps}",
                  f"trainer.global_batch_size={args.batch}", f"trainer.micro_batch_size={args.micro_batch}",
                  f"seq_len={args.seq_len}", "logging.progress=false", "trainer.checkpoint_every=100000"]
        kd = [f"stage.distill.teacher_path={teacher}", f"stage.distill.top_k={args.top_k}"]
        runs = {
            "pretrain": ("pretrain_phase1", []),
            "midtrain_online": ("midtrain_phase1", [*kd, "stage.distill.teacher=online"]),
            "midtrain_cached": ("midtrain_phase1", [*kd, "stage.distill.teacher=cached"]),
        }
        results = {}
        for name, (phase, extra) in runs.items():
            run_dir = root / name
            overrides = [f"run_dir={run_dir}", *common, *extra]
            if phase.startswith("midtrain"):
                overrides.append("init_from=null")  # a fresh student: same start as pretraining
            cfg = compose(phase, overrides, config_dir())
            start = time.perf_counter()
            run_phase(cfg)
            results[name] = {"median_step_s": median_step_time(run_dir), "wall_s": time.perf_counter() - start}
            stats = run_dir / "teacher_cache" / "write_stats.json"
            if stats.is_file():
                results[name]["cache"] = json.loads(stats.read_text())
    base = results["pretrain"]["median_step_s"]
    print(f"model=mobilellm_tiny batch={args.batch}x{args.seq_len} top_k={args.top_k} steps={args.steps}")
    for name, r in results.items():
        extra = f"  cache write {r['cache']}" if "cache" in r else ""
        print(f"{name:16s} {r['median_step_s']:.3f} s/step  x{r['median_step_s'] / base:.2f} vs pretrain{extra}")


if __name__ == "__main__":
    main()

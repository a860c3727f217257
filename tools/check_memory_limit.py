"""A model whose full fp32 weights do not fit one process's memory limit trains under FSDP2.

    python tools/check_memory_limit.py                       # mobilellm_950m, 4 processes, limit 0.9x
    python tools/check_memory_limit.py --model mobilellm_360m --nproc 4 --limit 0.9

Each process (torch's elastic launcher, gloo, CPU) sets RLIMIT_DATA, right after its imports, to
its data size then plus ``--limit`` x the model's full fp32 size plus a small allowance for what
is not the model (``--allowance-mib``: thread stacks, the loader, gloo buffers): with 0.9 and the
default allowance the process can never hold the whole mobilellm_950m. Under that limit it runs ct-train's pretraining phase on the embedded sample
data: builds the model (on meta, its own shards only), trains ``--steps`` steps with a checkpoint
half way, resumes from that checkpoint in a second run that finishes the steps, and exports the
HF model (streamed, one tensor at a time). The same two runs without the limit give the
reference losses; the check passes when every step's loss is equal and the export loads.

SGD without momentum keeps each rank's steady state (its shard of the weights and of the
gradients) at 2/N of the model; AdamW adds 2/N more, so at N=2 the sharded training state alone
is already twice the model and no limit below the model's size can hold it.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _vm_data_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def overrides(run_dir: Path, sample_dir: Path, model: str, steps: int) -> list[str]:
    return [f"run_dir={run_dir}", f"sample_data.dir={sample_dir}", "sample_data.scale=0.1", f"model={model}",
            "distributed=fsdp2", "optimizer=sgd", "optimizer.momentum=0.0", "optimizer.lr=0.01",
            f"trainer.max_steps={steps}", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
            "seq_len=32", f"trainer.checkpoint_every={steps // 2}", "trainer.log_every=1",
            "trainer.eval_every=0", "logging.progress=false", "schedule.name=constant", "schedule.warmup_steps=0"]


def _prepare_data(sample_dir: Path) -> None:
    from ct_data import sample

    sample.build(sample_dir, seed=0, scale=0.1)
    sample.build_tokenizer(sample_dir, 8192, split_digits=True)


def worker(args) -> None:
    from ct_cli.common import config_dir, run_config
    from ct_model import count_parameters, presets
    from ct_stages.run import run_phase

    full = 4 * count_parameters(presets.get(args.model))
    if args.limit > 0:
        limit = _vm_data_bytes() + int(args.allowance_mib * 2**20) + int(args.limit * full)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    run_dir, sample_dir = Path(args.run_dir), Path(args.run_dir).parent / "sample"
    # --stop-at: the first launch ends at the half-way checkpoint; the second resumes from it.
    config = overrides(run_dir, sample_dir, args.model, args.steps) + [f"trainer.max_steps={args.stop_at}"]
    run_phase(run_config("pretrain_phase1", config, config_dir()))


def launch(args, run_dir: Path, limit: float) -> dict[int, float]:
    """Two launches: to the half-way checkpoint, then a rerun that resumes and finishes (and exports)."""
    from ct_stages.metrics import read_losses

    for stop_at in (args.steps // 2, args.steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--worker", "--model", args.model, "--steps", str(args.steps), "--limit", str(limit),
               "--run-dir", str(run_dir), "--allowance-mib", str(args.allowance_mib), "--stop-at", str(stop_at)]
        # One malloc arena: glibc reserves 64 MiB of address space per thread arena, which RLIMIT_DATA
        # counts although nothing is used (threads then fail to start with EAGAIN).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_ARENA_MAX": "1",
               "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"limit {limit}, steps to {stop_at}: the run failed ({proc.returncode}):\n"
                             f"{proc.stderr[-4000:]}")
    return read_losses(run_dir / "metrics.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilellm_950m")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--limit", type=float, default=0.9, help="data limit above the imports, x full fp32 size")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--allowance-mib", type=float, default=256,
                        help="for what is not the model: threads' stacks, the loader, gloo buffers")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--stop-at", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    from ct_model import count_parameters, hf, presets

    full = 4 * count_parameters(presets.get(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("limited", "free"):  # the sample data and tokenizer, built here, not under the limit
            _prepare_data(Path(tmp) / name / "sample")
        limited = launch(args, Path(tmp) / "limited" / "run", args.limit)
        free = launch(args, Path(tmp) / "free" / "run", 0.0)
        model, _ = hf.load_hf(Path(tmp) / "limited" / "run" / "hf")
        print(f"{args.model}: full fp32 {full / 2**30:.2f} GiB; {args.nproc} processes under FSDP2, each limited "
              f"to its data size after imports + {args.limit} x that ({args.limit * full / 2**30:.2f} GiB)")
        for step in sorted(free):
            print(f"  step {step}: loss {limited.get(step, float('nan')):.6f} limited, {free[step]:.6f} without limit")
        same = limited == free and len(free) == args.steps
        print(f"  resumed half way, exported {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"losses {'equal' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""A model whose full fp32 weights do not fit one process's memory limit trains under FSDP2.

    python tools/check_memory_limit.py                       # mobilellm_950m, 8 processes, limit 0.9x
    python tools/check_memory_limit.py --model mobilellm_tiny --nproc 2 --limit 0.9   # seconds

Each process (torch's elastic launcher, gloo, CPU) sets RLIMIT_DATA, right after its imports, to
its data size then plus ``--limit`` x the model's full fp32 size plus a small allowance for what
is not the model (``--allowance-mib``: thread stacks, the loader, gloo buffers): with 0.9 and the
default allowance the process can never hold the whole mobilellm_950m (its 22 layers, with the
embedding sized to the sample tokenizer's 8,192 tokens: see ``overrides``). Under that limit it runs ct-train's pretraining phase on the embedded sample
data: builds the model (on meta, its own shards only), trains ``--steps`` steps with a checkpoint
half way, resumes from that checkpoint in a second run that finishes the steps, and exports the
HF model (streamed, one tensor at a time). The same two runs without the limit give the
reference losses; the check passes when every step's loss is equal and the export loads.

SGD without momentum keeps each rank's steady state (its shard of the weights and of the
gradients) at 2/N of the model; AdamW adds 2/N more, so at N=2 the sharded training state alone
is already twice the model and no limit below the model's size can hold it. Beyond the shards a
rank holds, for a moment, whole layers: the running and the prefetched block gathered, gloo's
staging copy of each all-gather, a block's unsharded gradients before their reduce-scatter; at
N=4 that passes 0.9 of mobilellm_950m (measured: it runs out in the first backward), at N=8 it
fits, hence the default.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


VOCAB = 8192  # the sample tokenizer's


def full_fp32_bytes(model: str) -> int:
    import dataclasses

    from ct_model import count_parameters, presets

    return 4 * count_parameters(dataclasses.replace(presets.get(model), vocab_size=VOCAB))


def _vm_data_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData in /proc/self/status")


def overrides(run_dir: Path, sample_dir: Path, model: str, steps: int, nproc: int) -> list[str]:
    # One row per process per micro-batch: the global batch splits over any --nproc. The embedding
    # is sized to the sample tokenizer (VOCAB rows, not the preset's 128,256): FSDP2 gathers it
    # whole with its root module, and gloo's all-gather stages a second full copy of it, 2 x 21%
    # of mobilellm_950m at 128,256 rows: a CPU-only cost that would hide what this checks.
    return [f"model.vocab_size={VOCAB}", f"run_dir={run_dir}", f"sample_data.dir={sample_dir}", "sample_data.scale=0.1", f"model={model}",
            "distributed=fsdp2", "optimizer=sgd", "optimizer.momentum=0.0", "optimizer.lr=0.01",
            f"trainer.max_steps={steps}", f"trainer.global_batch_size={math.lcm(4, nproc)}", "trainer.micro_batch_size=1",
            "seq_len=32", f"trainer.checkpoint_every={steps // 2}", "trainer.log_every=1",
            "trainer.eval_every=0", "logging.progress=false", "schedule.name=constant", "schedule.warmup_steps=0"]


def _prepare_data(sample_dir: Path) -> None:
    from ct_data import sample

    sample.build(sample_dir, seed=0, scale=0.1)
    sample.build_tokenizer(sample_dir, VOCAB, split_digits=True)


def worker(args) -> None:
    from ct_cli.common import config_dir, run_config
    from ct_stages.run import run_phase

    full = full_fp32_bytes(args.model)
    if args.limit > 0:
        limit = _vm_data_bytes() + int(args.allowance_mib * 2**20) + int(args.limit * full)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    run_dir, sample_dir = Path(args.run_dir), Path(args.run_dir).parent / "sample"
    # --stop-at: the first launch ends at the half-way checkpoint; the second resumes from it.
    nproc = int(os.environ["WORLD_SIZE"])  # set by the launcher
    config = overrides(run_dir, sample_dir, args.model, args.steps, nproc) + [f"trainer.max_steps={args.stop_at}"]
    run_phase(run_config("pretrain_phase1", config, config_dir()))


def _small_thread_stacks() -> None:
    """In the launcher before exec: glibc sizes every new thread's stack from RLIMIT_STACK (8 MiB
    here), and RLIMIT_DATA counts that reserved address space; the datasets library alone starts
    16 threads to open a source. 2 MiB stacks leave the limit to what the run really holds."""
    resource.setrlimit(resource.RLIMIT_STACK, (2 * 2**20, resource.getrlimit(resource.RLIMIT_STACK)[1]))


def launch(args, run_dir: Path, limit: float) -> dict[int, float]:
    """Two launches: to the half-way checkpoint, then a rerun that resumes and finishes (and exports)."""
    from ct_stages.metrics import read_losses

    for stop_at in (args.steps // 2, args.steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--worker", "--model", args.model, "--steps", str(args.steps), "--limit", str(limit),
               "--run-dir", str(run_dir), "--allowance-mib", str(args.allowance_mib), "--stop-at", str(stop_at)]
        # One malloc arena: glibc reserves 64 MiB of address space per thread arena, which RLIMIT_DATA
        # counts although nothing is used (threads then fail to start with EAGAIN).
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
               "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, preexec_fn=_small_thread_stacks)
        if proc.returncode:  # every rank's error line first: torchrun's own report comes last
            errors = [line for line in proc.stderr.splitlines() if "Error:" in line and "]: " in line]
            raise SystemExit(f"limit {limit}, steps to {stop_at}: the run failed ({proc.returncode}):\n"
                             + "\n".join(errors[:8]) + f"\n{proc.stderr[-2000:]}")
    return read_losses(run_dir / "metrics.jsonl")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilellm_950m")
    parser.add_argument("--nproc", type=int, default=8)
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
    from ct_model import hf

    full = full_fp32_bytes(args.model)
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

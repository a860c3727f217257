"""Peak memory of building a model under FSDP2, per process, against the model's full fp32 size.

    python tools/bench_startup_memory.py --model mobilellm_950m --nproc 1 2 4
    python tools/bench_startup_memory.py --model mobilellm_360m --nproc 1 2 --whole   # + the old way

Each process (launched with torch's elastic launcher, gloo) imports everything and joins the
process group, then its resident-set high-water mark is reset (/proc/self/clear_refs, 5) and the
model is built: on ``meta`` and materialised shard by shard from fresh layout-independent weights
(what ct-train does), or, with ``--whole``, the old way for comparison (the full model built in
the process, then FSDP2-sharded). The figure is (VmHWM - VmRSS before the build) / full fp32 size
of the model, per rank; the issue's goal under FSDP2 x 2 is at most ~0.6.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(model_name: str, whole: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    from ct_model import build_model, count_parameters, presets
    from ct_model.init import SeededInit
    from ct_parallel import DistributedConfig, build_engine, init_distributed

    config = presets.get(model_name)
    dcfg = DistributedConfig(engine="native", strategy="fsdp2")
    init_distributed(dcfg)
    torch.set_num_threads(1)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    baseline = _status_kib("VmRSS")
    if whole:
        engine = build_engine(build_model(config, seed=0), dcfg)
    else:
        model = build_model(config, device="meta")
        engine = build_engine(model, dcfg, weights=SeededInit(model, 0))
    peak = _status_kib("VmHWM")
    full = 4 * count_parameters(config)
    record = {"rank": dist.get_rank(), "world": dist.get_world_size(), "baseline_mib": baseline / 1024,
              "peak_above_mib": (peak - baseline) / 1024, "full_fp32_mib": full / 2**20,
              "ratio": (peak - baseline) * 1024 / full}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, record)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(parts))
    del engine


def launch(model: str, nproc: int, whole: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               __file__, "--worker", "--model", model, "--out", str(out)] + (["--whole"] if whole else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"nproc {nproc} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilellm_950m")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--whole", action="store_true", help="also measure the old way (full build, then shard)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.model, args.whole, args.out)
        return 0
    print(f"{'model':<16} {'build':<12} {'procs':>5} {'full fp32 MiB':>14} {'peak above baseline MiB (per rank)':>36} "
          f"{'max ratio':>9}")
    for whole in ([False, True] if args.whole else [False]):
        for nproc in args.nproc:
            parts = launch(args.model, nproc, whole)
            peaks = ", ".join(f"{p['peak_above_mib']:.0f}" for p in parts)
            print(f"{args.model:<16} {'whole+shard' if whole else 'meta+shards':<12} {nproc:>5} "
                  f"{parts[0]['full_fp32_mib']:>14.0f} {peaks:>36} {max(p['ratio'] for p in parts):>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

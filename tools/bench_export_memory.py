"""Peak memory of an HF export fed one fresh tensor at a time, as an engine's full_state_items yields.

    python tools/bench_export_memory.py                      # mobilellm_140m, 100 MB and 5 GB shards

For each shard size: a thread samples the process's anonymous resident memory (RssAnon) while
``ct_model.hf.write_hf`` writes the model; each tensor handed over is a fresh copy, dropped by the
caller once the writer asks for the next (what an engine gathering one DTensor at a time does).
Prints the peak growth over the memory before the export, against the model's fp32 size and its
largest tensor (the least any export must hold once).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def peak_during(fn) -> int:
    """Peak RssAnon growth while ``fn()`` runs (sampled every millisecond)."""
    base, peak, done = rss_anon(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon() - base)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return peak[0]


def main() -> int:
    import torch

    from ct_model import build_model, presets
    from ct_model.hf import write_hf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilellm_140m")
    parser.add_argument("--shard-bytes", type=float, nargs="+", default=[100e6, 5e9])
    args = parser.parse_args()
    model = build_model(presets.get(args.model), seed=0)
    state = model.state_dict()
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors once
    largest = max(v.numel() * v.element_size() for v in state.values())
    print(f"{args.model}: {total / 1e6:,.0f} MB fp32, largest tensor {largest / 1e6:,.0f} MB")

    def items():
        for name, value in state.items():
            copy = value.detach().clone()  # a fresh tensor, as an engine's gather gives
            yield name, copy
            del copy

    for shard in args.shard_bytes:
        with tempfile.TemporaryDirectory() as out:
            with torch.no_grad():
                peak = peak_during(lambda: write_hf(items(), model.config, out, max_shard_bytes=int(shard)))
            files = len(list(Path(out).glob("*.safetensors")))
        print(f"  max_shard_bytes {shard:.0e}: {files} file(s), peak RssAnon growth {peak / 1e6:,.0f} MB "
              f"({peak / largest:.2f} x the largest tensor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

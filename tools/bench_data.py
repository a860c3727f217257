#!/usr/bin/env python
"""Throughput of the ct-data pipeline: read + tokenize + pack + batch, in tokens per second.

    .venv/bin/python tools/bench_data.py                      # sample corpus, 8k BPE, seq 2048
    .venv/bin/python tools/bench_data.py --tokens 2000000 --json out.json

Measures, on the embedded sample corpus (built on first use):
- pretrain: synchronous (prefetch=0) tokens/s of the pretraining loader (prose + code + math mix);
- sft: the same for the reasoning-SFT loader (chat template + assistant masks + best-fit packing);
- overlap: with the background prefetch thread and a simulated training step of --step-ms, the mean
  time next() blocks, i.e. how long a training step would wait for data.
Tokens counted are all positions of the produced batches (padding included; pretraining has none).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def run_loader(loader, tokens: int, seq_len: int, rows: int) -> dict:
    steps = max(1, tokens // (seq_len * rows))
    next(loader)  # first batch: opening files, warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    dt = time.perf_counter() - t0
    n = steps * seq_len * rows
    st = loader.stats()
    return {"steps": steps, "tokens": n, "seconds": round(dt, 3), "tokens_per_s": round(n / dt),
            "packing_efficiency": round(st["packing_efficiency"], 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample-dir", default=os.path.join(tempfile.gettempdir(), "ct_data_bench_sample"))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub name (default: a BPE trained on the sample)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (rows per step)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to produce per measurement")
    p.add_argument("--step-ms", type=float, default=200.0, help="simulated training step for the overlap test")
    p.add_argument("--overlap-steps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    from ct_data import build_pretrain_loader, build_sft_loader, load_tokenizer, sample

    t0 = time.perf_counter()
    sample.build(args.sample_dir, seed=0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else sample.build_tokenizer(args.sample_dir, args.vocab_size)
    tok_s = time.perf_counter() - t0

    B, T = args.batch_size, args.seq_len
    pre = sample.pretrain_sources(args.sample_dir)
    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {"seq_len": T, "batch_size": B, "vocab_size": tok.vocab_size, "tokens": args.tokens},
        "sample_build_s": round(build_s, 2),
        "tokenizer_s": round(tok_s, 2),
    }
    results["pretrain"] = run_loader(build_pretrain_loader(pre, tok, T, B, seed=0, prefetch=0), args.tokens, T, B)
    results["sft"] = run_loader(build_sft_loader(sample.sft_sources(args.sample_dir, "reasoning"), tok, T, B,
                                                 seed=0, prefetch=0), args.tokens, T, B)
    # Overlap: a training step of step_ms; how long does next() block with prefetching?
    loader = build_pretrain_loader(pre, tok, T, B, seed=0, prefetch=4)
    next(loader)
    waits = []
    for _ in range(args.overlap_steps):
        time.sleep(args.step_ms / 1000)
        t = time.perf_counter()
        next(loader)
        waits.append(time.perf_counter() - t)
    loader.close()
    results["overlap"] = {"step_ms": args.step_ms, "mean_wait_ms": round(1000 * sum(waits) / len(waits), 3),
                          "max_wait_ms": round(1000 * max(waits), 3)}

    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

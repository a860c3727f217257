"""Benchmark ct-distill: peak memory of full vs chunked KD loss, and the teacher cache.

    .venv/bin/python tools/bench_kd_loss.py                  # T=1024 (about 1-2 min on 2 cores)
    .venv/bin/python tools/bench_kd_loss.py --seq-len 4096   # the issue's shape (slower, ~12 GB)

1. KD loss, forward + backward, fp32, V=128256, hidden 1536, batch 1, teacher = cached top-64
   (ids + log-probs), kind forward_kl, T=1, on materialised logits (``kd_loss(fused=False)``:
   plain autograd; ``kd_loss``: closed-form gradient) versus ``chunked_kd_loss`` from hidden
   states. Each variant runs in a fresh subprocess; on CPU its peak
   is the process's peak resident set (VmHWM, reset after the inputs are built), reported as the
   peak above that baseline; on CUDA, ``torch.cuda.max_memory_allocated`` above the inputs.
   Inputs (hidden, output weight, teacher top-k) are in the baseline; the weight gradient
   ([V, H], 0.79 GB) is counted in every variant, as any backward allocates it.
2. Cached teacher on mobilellm_tiny (V=8192), k=64: write throughput end to end (teacher forward +
   top-k + write) and of the writer alone (top-k precomputed), bytes per token, read throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def run_variant(args) -> dict:
    """One loss variant, measured in this (fresh) process."""
    from ct_distill import TopK, chunked_kd_loss, kd_loss

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    g = torch.Generator(device=device).manual_seed(0)
    T, V, H, k = args.seq_len, args.vocab, args.hidden, args.k
    hidden = torch.randn(1, T, H, generator=g, device=device).requires_grad_()
    weight = (torch.randn(V, H, generator=g, device=device) * 0.02).requires_grad_()
    teacher_logits = torch.randn(1, T, k, generator=g, device=device).sort(-1, descending=True).values
    teacher = TopK(torch.randint(0, V, (1, T, k), generator=g, device=device),
                   torch.log_softmax(teacher_logits, -1) - 1.0)
    labels = torch.randint(0, V, (1, T), generator=g, device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status("VmRSS")
        if not _reset_peak_rss():
            base = 0  # fall back to the absolute peak
    start = time.perf_counter()
    if args.variant in ("autograd", "fused"):
        loss = kd_loss(hidden @ weight.T, teacher, labels, fused=args.variant == "fused")
    else:
        loss = chunked_kd_loss(hidden, weight, teacher, labels, chunk_size=args.chunk_size)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {"variant": args.variant, "chunk_size": args.chunk_size, "seq_len": T,
            "loss": loss.item(), "seconds": seconds, "peak_bytes": peak - base,
            "logits_bytes": T * V * 4, "weight_grad_bytes": V * H * 4}


def measure_loss(args, variant: str, chunk_size: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--chunk-size", str(chunk_size),
           "--seq-len", str(args.seq_len), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--k", str(args.k), "--device", args.device, "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cache(args) -> dict:
    import ct_model
    from ct_distill import (OnlineTeacher, TeacherCacheReader, TeacherCacheWriter,
                            write_teacher_cache)

    torch.set_num_threads(args.threads)
    config = ct_model.presets.get("mobilellm_tiny")
    teacher = OnlineTeacher(ct_model.build_model(config, seed=0))
    seq, batch, steps = args.cache_seq_len, 4, args.cache_batches
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=g)}
               for _ in range(steps)]
    with tempfile.TemporaryDirectory() as tmp:
        teacher.topk(batches[0]["input_ids"][:1, :64], args.k)  # warm-up
        index = write_teacher_cache(teacher, batches, Path(tmp) / "e2e", k=args.k)
        topks = [teacher.topk(b["input_ids"], args.k) for b in batches]
        start = time.perf_counter()
        with TeacherCacheWriter(Path(tmp) / "w", seq_len=seq, k=args.k, vocab_size=config.vocab_size,
                                teacher=teacher.identity(), seqs_per_shard=8) as writer:
            for b, topk in zip(batches, topks):
                writer.add(b["input_ids"], topk)
        write_only = time.perf_counter() - start
        reader = TeacherCacheReader(Path(tmp) / "w")
        start = time.perf_counter()
        for i in range(steps):
            reader.annotate(batches[i], range(i * batch, (i + 1) * batch))
        read = time.perf_counter() - start
    tokens = steps * batch * seq
    return {"k": args.k, "tokens": tokens, "vocab_size": config.vocab_size,
            "bytes_per_token": index["bytes_per_token"],
            "end_to_end_tokens_per_s": index["tokens_per_second"],
            "writer_only_tokens_per_s": tokens / write_only,
            "read_tokens_per_s": tokens / read}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--chunk-sizes", default="256,1024")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--cache-seq-len", type=int, default=512)
    p.add_argument("--cache-batches", type=int, default=4)
    p.add_argument("--skip-cache", action="store_true")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--chunk-size", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    gib = 1 / 2**30
    print(f"KD loss fwd+bwd, fp32, V={args.vocab}, H={args.hidden}, T={args.seq_len}, batch 1, "
          f"teacher cached top-{args.k}, device {args.device}")
    results = [measure_loss(args, "autograd", 0), measure_loss(args, "fused", 0)]
    results += [measure_loss(args, "chunked", int(c)) for c in args.chunk_sizes.split(",")]
    full = results[0]
    print(f"  one copy of the logits: {full['logits_bytes'] * gib:.2f} GiB; weight grad "
          f"{full['weight_grad_bytes'] * gib:.2f} GiB (in every variant)")
    for r in results:
        name = r["variant"] if r["variant"] != "chunked" else f"chunked({r['chunk_size']})"
        print(f"  {name:15s} peak above inputs {r['peak_bytes'] * gib:6.2f} GiB   "
              f"autograd/this {full['peak_bytes'] / r['peak_bytes']:5.2f}x   "
              f"{r['seconds']:6.1f} s   loss {r['loss']:.6f}")
    out = {"loss": results}
    if not args.skip_cache:
        c = bench_cache(args)
        out["cache"] = c
        print(f"Teacher cache, mobilellm_tiny (V={c['vocab_size']}), k={c['k']}, {c['tokens']} tokens:")
        print(f"  bytes/token {c['bytes_per_token']:.1f} (int32 ids + float16 log-probs = {6 * c['k']})")
        print(f"  write end to end (teacher fwd + top-k + write) {c['end_to_end_tokens_per_s']:,.0f} tok/s; "
              f"writer alone {c['writer_only_tokens_per_s']:,.0f} tok/s; "
              f"read+check {c['read_tokens_per_s']:,.0f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

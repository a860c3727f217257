"""Peak memory and time of loss + backward: unchunked vs chunked linear cross-entropy (CPU).

Each variant runs in its own subprocess; peak memory is the growth of the process's max RSS over
the inputs already allocated, so the variants are compared on the same footing.

    uv run python tools/bench_loss_memory.py --tokens 8192 --vocab 128256 --hidden 1536 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _one(args) -> dict:
    import torch

    from ct_model.chunked_ce import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_(True)
    labels = torch.randint(0, args.vocab, (args.tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    linear_cross_entropy(hidden, weight, labels, chunk_tokens=args.variant).backward()
    seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return {"chunk_tokens": args.variant, "seconds": seconds, "peak_mib": peak_mib}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128_256)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant is not None:
        print(json.dumps(_one(args)))
        return
    rows = []
    for variant in (0, args.chunk):
        cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
               "--hidden", str(args.hidden), "--variant", str(variant)]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(rows[-1], flush=True)
    base, chunked = rows
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} chunk={args.chunk}: "
          f"peak memory {base['peak_mib'] / max(chunked['peak_mib'], 1e-9):.1f}x lower, "
          f"time {chunked['seconds'] / base['seconds']:.2f}x")


if __name__ == "__main__":
    main()

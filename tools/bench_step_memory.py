"""Peak memory of one training step (forward + backward + AdamW step) of a preset on CPU, with
the full logits (loss.chunk_tokens=0) and with the chunked loss, at several sequence lengths.

Each (seq, chunk) runs in its own subprocess; peak memory is the process's max RSS
(resource.getrusage), reported in total and as growth over the built model, so every variant is
measured on the same footing. The step is the pretraining stage's: ct_model.loss.CrossEntropyLoss
through NativeEngine.forward_backward, micro batch 1, random tokens.

    uv run python tools/bench_step_memory.py --model mobilellm_140m --seq 2048 4096 --chunk 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _one(args) -> dict:
    import torch

    import ct_model
    from ct_parallel import build_native_engine
    from ct_model.loss import CrossEntropyLoss

    torch.manual_seed(0)
    config = ct_model.presets.get(args.model, max_position_embeddings=max(args.variant_seq, 2048))
    model = ct_model.build_model(config, seed=0)
    engine = build_native_engine(model)
    engine.setup_optimizer(lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-4))
    loss = CrossEntropyLoss(chunk_tokens=args.variant_chunk, fused_kernel="none")
    ids = torch.randint(0, config.vocab_size, (1, args.variant_seq + 1))
    mb = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    base = _rss_mib()
    start = time.perf_counter()
    result = engine.forward_backward([mb], loss)
    engine.optimizer_step()
    engine.zero_grad()
    seconds = time.perf_counter() - start
    peak = _rss_mib()
    return {"seq": args.variant_seq, "chunk_tokens": args.variant_chunk, "loss": result.loss,
            "seconds": round(seconds, 1), "model_mib": round(base), "peak_mib": round(peak),
            "step_growth_mib": round(peak - base)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilellm_140m")
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--variant-seq", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant-chunk", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant_seq is not None:
        print(json.dumps(_one(args)))
        return
    for seq in args.seq:
        rows = []
        for chunk in (0, args.chunk):
            cmd = [sys.executable, __file__, "--model", args.model, "--variant-seq", str(seq),
                   "--variant-chunk", str(chunk)]
            rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
            print(json.dumps(rows[-1]), flush=True)
        full, chunked = rows
        print(f"{args.model} seq={seq} chunk={args.chunk}: peak RSS {full['peak_mib']} -> {chunked['peak_mib']} MiB "
              f"({full['peak_mib'] / chunked['peak_mib']:.2f}x lower); step growth {full['step_growth_mib']} -> "
              f"{chunked['step_growth_mib']} MiB ({full['step_growth_mib'] / max(chunked['step_growth_mib'], 1):.2f}x); "
              f"loss {full['loss']:.6f} vs {chunked['loss']:.6f}; time {chunked['seconds'] / full['seconds']:.2f}x",
              flush=True)


if __name__ == "__main__":
    main()

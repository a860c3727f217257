"""Forward+backward throughput of ct-model against HF transformers on the same shape, one process.

    uv run python tools/bench_model.py [--preset mobilellm_tiny] [--batch 8] [--seq 256] [--steps 10]

Both models get identical weights (ours exported through ct_model.hf and loaded by transformers),
the same batch and the same thread count; the ratio ours/HF is what to read.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import transformers

import ct_model
from ct_model.hf import save_hf


def time_steps(step, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mobilellm_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arch", default="llama4", choices=["llama4", "llama"])
    args = parser.parse_args()

    config = ct_model.presets.get(args.preset)
    if args.arch == "llama":
        config = config.replace(qk_layernorm=False)
    ours = ct_model.build_model(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(ours, tmp, arch=args.arch)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    labels = ids.roll(-1, 1)

    def ours_step():
        logits = ours(ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    def hf_step():
        logits = theirs(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()

    tokens = args.batch * args.seq
    # Alternate the two in rounds so drift in machine load hits both alike; report medians.
    rates: dict[str, list[float]] = {"ct_model": [], "hf": []}
    for _ in range(args.rounds):
        rates["hf"].append(tokens / time_steps(hf_step, args.steps))
        rates["ct_model"].append(tokens / time_steps(ours_step, args.steps))
    ours_rate, hf_rate = (statistics.median(rates[k]) for k in ("ct_model", "hf"))
    print(f"preset={args.preset} arch={type(theirs).__name__} batch={args.batch} seq={args.seq} "
          f"threads={torch.get_num_threads()} torch={torch.__version__} transformers={transformers.__version__}")
    print(f"ct_model   {ours_rate:10.0f} tokens/s (forward+backward, median of {args.rounds} rounds)")
    print(f"HF         {hf_rate:10.0f} tokens/s")
    print(f"ratio ct_model/HF = {ours_rate / hf_rate:.2f}")

if __name__ == "__main__":
    main()

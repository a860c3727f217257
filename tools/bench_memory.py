"""Peak memory and time of one training step with activation checkpointing none / selective / full (CPU).

One subprocess per mode, so no mode inherits another's allocator state. In each: build the model
(fp32) and AdamW, materialise AdamW's state (a step with zero gradients at lr=0, so the measured
step allocates no optimizer state), free the gradients, and take that RSS as the baseline. Then
one step (forward, chunked cross-entropy from the hidden states, backward, AdamW step) and its peak
RSS above the baseline: Linux's VmHWM, reset to the current RSS just before the step (write "5"
to /proc/self/clear_refs); where that reset is unavailable, ru_maxrss (which then also covers the
build). The loss is the chunked linear cross-entropy (no [tokens, vocab] logits), so what differs
between the modes is the blocks' activations. Ratios are against ``none`` in the same run.

    uv run python tools/bench_memory.py                  # mobilellm_140m, seq 2048, micro batch 1
    uv run python tools/bench_memory.py --smoke          # tiny shape, seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("none", "selective", "full")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _config(args):
    from ct_model import presets

    if args.smoke:
        return presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=4,
                           num_query_groups=2, kv_channels=16, ffn_hidden_size=128, vocab_size=512)
    return presets.get(args.model)


def _one(args) -> dict:
    import gc

    import torch

    from ct_model import build_model, count_parameters
    from ct_model.chunked_ce import linear_cross_entropy
    from ct_parallel import ActivationCheckpointConfig, apply_activation_checkpointing

    torch.manual_seed(0)
    config = _config(args)
    model = build_model(config, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=args.mode))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for group in opt.param_groups:  # materialise the state without moving the weights
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for group in opt.param_groups:
        group["lr"] = 1e-4
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    gc.collect()
    base = _rss_kib("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    hidden = model.hidden_states(ids[:, :-1])
    loss = linear_cross_entropy(hidden, model.output_weight, ids[:, 1:], chunk_tokens=args.chunk_tokens)
    (loss / ids[:, 1:].numel()).backward()
    opt.step()
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": args.mode, "peak_mib": (peak - base) / 1024, "seconds": seconds, "peak_is_step_only": exact,
            "loss": loss.item() / ids[:, 1:].numel(), "parameters": count_parameters(model)}


def _table(rows: list[dict]) -> str:
    none = rows[0]
    lines = [f"{'mode':<10} {'peak MiB':>9} {'x none':>7} {'step s':>8} {'x none':>7} {'loss':>9}"]
    for r in rows:
        lines.append(f"{r['mode']:<10} {r['peak_mib']:>9.0f} {r['peak_mib'] / none['peak_mib']:>7.2f} "
                     f"{r['seconds']:>8.1f} {r['seconds'] / none['seconds']:>7.2f} {r['loss']:>9.5f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilellm_140m")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="tiny shape (seconds), to check the tool runs")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.seq = min(args.seq, 64)
    if args.mode is not None:
        print(json.dumps(_one(args)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--model", args.model, "--seq", str(args.seq), "--batch", str(args.batch),
               "--chunk-tokens", str(args.chunk_tokens), "--mode", mode] + (["--smoke"] if args.smoke else [])
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(json.dumps(rows[-1]), flush=True)
    shape = "smoke" if args.smoke else args.model
    print(f"{shape} ({rows[0]['parameters'] / 1e6:.1f}M parameters), seq {args.seq}, micro batch {args.batch}, "
          f"one step (forward + backward + AdamW), peak RSS above model + optimizer"
          + ("" if rows[0]["peak_is_step_only"] else " (ru_maxrss: includes the build)"))
    print(_table(rows))


if __name__ == "__main__":
    main()

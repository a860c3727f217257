"""Run under torchrun (2 processes, gloo): precision=bf16 under DDP and FSDP2 against a single-process
bf16-autocast reference (first step's loss and gradients).

    torchrun --nproc-per-node 2 dist_precision_checks.py OUT_JSON
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_precision import PrecisionConfig

BF16 = PrecisionConfig(dtype="bf16", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16")


def reference(config, batch):
    model = build_model(config, seed=0)
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in batch)
    total = 0.0
    for mb in batch:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(mb["input_ids"], mb["position_ids"], mb["document_ids"])
        loss = lib.loss_fn(mb, logits)
        (loss / tokens).backward()
        total += loss.item()
    return total / tokens, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def main():
    out_path = sys.argv[1]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    loss_ref, grads_ref = reference(config, batch)
    results = {}
    for strategy in ("ddp", "fsdp2"):
        dcfg = DistributedConfig(engine="native", strategy=strategy)
        info = init_distributed(dcfg)
        model = build_model(config, seed=0)
        engine = build_engine(model, dcfg, precision=BF16)
        engine.setup_optimizer(lib.build_optimizer)
        loss = engine.forward_backward(lib.shard_for_dp(batch, info.dp_rank, info.dp_size), lib.loss_fn).loss
        grads = {}
        for k, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[k] = g.detach().float().clone()
        if info.rank == 0:
            results[strategy] = {"loss": abs(loss - loss_ref) / abs(loss_ref),
                                 "grad": lib.compare(f"{strategy} bf16 grads", grads, grads_ref, tol=1.0)}
        dist.barrier()
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

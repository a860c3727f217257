"""Run under torchrun (2 processes, gloo): precision=bf16 and fp8 under DDP and FSDP2 against a
single-process reference under bf16 autocast (FP8: the same model converted by convert_to_fp8)
(first step's loss and gradients).

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
from ct_precision import PrecisionConfig, convert_to_fp8

BF16 = PrecisionConfig(dtype="bf16", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16")
FP8 = PrecisionConfig(dtype="fp8", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16",
                      fp8_min_matmul_elements=0)


def reference(config, batch, precision, param_dtype=torch.float32):
    model = build_model(config, seed=0)
    if precision.fp8:
        convert_to_fp8(model, precision)
    model.to(param_dtype)
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in batch)
    total = 0.0
    for mb in batch:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(mb["input_ids"], mb["position_ids"], mb["document_ids"])
        loss = lib.loss_fn(mb, logits)
        (loss / tokens).backward()
        total += loss.item()
    return total / tokens, {k: p.grad.detach().float().clone() for k, p in model.named_parameters()}


def main():
    out_path = sys.argv[1]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    results = {}
    for name, precision in (("bf16", BF16), ("fp8", FP8)):
        for strategy in ("ddp", "fsdp2"):
            # FP8 under FSDP2 casts its weights to param_dtype (bf16) before the FP8 casts, so its
            # reference holds bf16 parameters too.
            param_dtype = torch.bfloat16 if (precision.fp8 and strategy == "fsdp2") else torch.float32
            loss_ref, grads_ref = reference(config, batch, precision, param_dtype)
            results[f"{name} {strategy}"] = check(config, batch, precision, strategy, loss_ref, grads_ref)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def check(config, batch, precision, strategy, loss_ref, grads_ref):
    """This layout's first-step (relative loss difference, worst relative grad difference)."""
    dcfg = DistributedConfig(engine="native", strategy=strategy)
    info = init_distributed(dcfg)
    model = build_model(config, seed=0)
    engine = build_engine(model, dcfg, precision=precision)
    engine.setup_optimizer(lib.build_optimizer)
    loss = engine.forward_backward(lib.shard_for_dp(batch, info.dp_rank, info.dp_size), lib.loss_fn).loss
    grads = {}
    for k, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[k] = g.detach().float().clone()
    full = engine.full_model_state_dict()  # collective; None off rank 0
    plain_keys = list(build_model(config, seed=0).state_dict())
    dist.barrier()
    return {"loss": abs(loss - loss_ref) / abs(loss_ref),
            "plain_state": full is None or (list(full) == plain_keys and all(type(v) is torch.Tensor for v in full.values())),
            "fp8_layers": sum(type(m).__name__ == "Float8Linear" for m in model.modules()),
            "grad": lib.compare(f"{strategy} {precision.dtype} grads", grads, grads_ref, tol=1.0)}


if __name__ == "__main__":
    main()

"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: precision=bf16 on megatron
TP=2 WITHOUT the distributed optimizer (bf16 Float16Module chunks, megatron's
Float16OptimizerWithFloat16Params stepping fp32 main copies) against the single-process native
bf16 engine (fp32 parameters, bf16 autocast): losses of 3 steps, step-0 gradients, weight updates.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_megatron_bf16_checks.py OUT_JSON CKPT_DIR
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_precision import PrecisionConfig

BF16 = PrecisionConfig(dtype="bf16", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16")


def reference(config, batch):
    engine = build_engine(build_model(config, seed=0), DistributedConfig(), precision=BF16)
    grads = lambda: {k: p.grad.detach().clone() for k, p in engine.model.named_parameters()}  # noqa: E731
    return lib.run_engine(engine, batch, grads_fn=grads)


def updates(params: dict, init: dict) -> dict:
    return {k: params[k].float() - init[k].float() for k in params}


def main():
    out_path, ckpt_dir = sys.argv[1:]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    init = build_model(config, seed=0).state_dict()
    losses_ref, grads_ref, params_ref = reference(config, batch)

    dcfg = DistributedConfig(engine="megatron", tensor_model_parallel_size=2)
    init_distributed(dcfg)
    engine = build_engine(build_model(config, seed=0), dcfg, precision=BF16)
    losses, grads, params = lib.run_engine(engine, batch, grads_fn=engine.full_grad_state_dict)
    result = {"optimizer": type(engine.megatron_optimizer).__name__,
              "param_dtype": str(next(engine.chunks[0].parameters()).dtype),
              "loss": lib.compare_losses("bf16 tp2 loss", losses, losses_ref, tol=1.0)}
    if params is not None:
        result["grad"] = lib.compare("bf16 tp2 grads", grads, grads_ref, tol=1.0)
        # Matrices: the 3-step AdamW update. Norm weights (~1.0) are held in bf16 by Float16Module,
        # whose spacing there (2^-7) exceeds 3 steps of lr 1e-3: compare them in bf16 ulps.
        matrices = [k for k in init if init[k].dim() >= 2]
        result["update"] = lib.compare("bf16 tp2 updates", updates({k: params[k] for k in matrices}, init),
                                       updates({k: params_ref[k] for k in matrices}, init), tol=1.0)
        result["norm_ulps"] = max(float((params[k].float() - params_ref[k].float()).abs().max()) / 2 ** -7
                                  for k in init if init[k].dim() == 1)
    # The checkpoint (bf16 weights + fp32 main params in the optimizer) reloads into a fresh engine.
    engine.save_checkpoint(ckpt_dir)
    fresh = build_engine(build_model(config, seed=1), dcfg, precision=BF16)
    fresh.setup_optimizer(lib.build_optimizer)
    fresh.load_checkpoint(ckpt_dir)
    reloaded = fresh.full_model_state_dict()
    if reloaded is not None:
        result["reload"] = lib.compare("bf16 tp2 reload", reloaded, params, tol=1.0)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

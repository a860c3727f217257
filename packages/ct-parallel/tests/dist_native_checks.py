"""Run under torchrun (2 processes, gloo): DDP and FSDP2 against the single-process reference,
then save an FSDP2 checkpoint (DCP) that the pytest process reloads in one process.

    torchrun --nproc-per-node 2 dist_native_checks.py OUT_JSON CKPT_DIR
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed


def main():
    out_path, ckpt_dir = sys.argv[1:3]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    losses_ref, grads_ref, params_ref = lib.reference(config, batch)
    results, saved = {}, None
    for strategy in ("ddp", "fsdp2"):
        t0 = time.perf_counter()
        dcfg = DistributedConfig(engine="native", strategy=strategy)
        info = init_distributed(dcfg)
        model = build_model(config, seed=0)
        engine = build_engine(model, dcfg)

        def grads():
            full = {}
            for k, p in model.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                full[k] = g.detach().clone()
            return full if info.rank == 0 else None

        losses, g, params = lib.run_engine(engine, lib.shard_for_dp(batch, info.dp_rank, info.dp_size), grads_fn=grads)
        r = {"loss": lib.compare_losses(f"{strategy} loss", losses, losses_ref),
             "grad": lib.compare(f"{strategy} grads", g, grads_ref),
             "param": lib.compare(f"{strategy} params", params, params_ref)}
        if strategy == "fsdp2":
            assert model.lm_head is None and model.output_weight is model.embed_tokens.weight, "tied embeddings untied"
            engine.save_checkpoint(ckpt_dir)
            saved = params  # what the checkpoint holds (full state dict on rank 0)
            # Same-layout resume: a fresh FSDP2 engine loads model + optimizer, and the next step
            # equals the step the saved engine takes.
            fresh_model = build_model(config, seed=1)
            fresh = build_engine(fresh_model, dcfg)
            fresh.setup_optimizer(lib.build_optimizer)
            fresh.load_checkpoint(ckpt_dir)
            shard = lib.shard_for_dp(batch, info.dp_rank, info.dp_size)
            for e in (engine, fresh):
                e.forward_backward(shard, lib.loss_fn)
                e.optimizer_step()
                e.zero_grad()
            lib.compare("fsdp2 resume", fresh.full_model_state_dict(), engine.full_model_state_dict(), tol=0.0)
        r["seconds"] = time.perf_counter() - t0
        results[strategy] = r
    if dist.get_rank() == 0:
        torch.save(saved, f"{out_path}.params.pt")
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under torchrun (2 processes, gloo): the DeepSeek-V3-shaped MoE model (MLA, a dense first
block, shared + routed experts, the sequence-wise aux loss on) under DDP=2 and FSDP2=2 against a
single-process reference written out here by hand: losses per step, weights after the steps and
each router's expert bias after its updates.

    torchrun --nproc-per-node 2 dist_moe_native_checks.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model, presets
from ct_model.moe import take_aux_loss, update_expert_bias
from ct_parallel import DistributedConfig, build_engine, init_distributed

STEPS = 4


def moe_config():
    # deepseek_v3_tiny's structure at test size; a bias update rate large enough to change
    # routing within the run, and the aux loss on so its path through the engine is checked too.
    return presets.get("deepseek_v3_tiny", hidden_size=64, ffn_hidden_size=96, vocab_size=256,
                       moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, q_lora_rank=32,
                       kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                       moe_router_bias_update_rate=0.05, moe_aux_loss_coeff=0.01, max_position_embeddings=64)


def reference(config, batch, steps: int = STEPS):
    """One process, every microbatch: (CE sum + aux x scored tokens) / global tokens, AdamW,
    then the bias update from all the microbatches' loads."""
    model = build_model(config, seed=0).train()
    opt = lib.build_optimizer(list(model.named_parameters()))
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in batch)
    losses, biases = [], []
    for _ in range(steps):
        total = 0.0
        for mb in batch:
            ce = lib.loss_fn(mb, model(mb["input_ids"], mb["position_ids"], mb["document_ids"]))
            aux = take_aux_loss(model)
            ((ce + aux * int((mb["labels"] != -100).sum())) / tokens).backward()
            total += ce.item()
        losses.append(total / tokens)
        opt.step()
        opt.zero_grad()
        update_expert_bias(model)
        biases.append(_biases(model))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, biases


def _biases(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("expert_bias")}


def main():
    out_path = sys.argv[1]
    config = moe_config()
    batch = lib.global_batch(config)
    losses_ref, params_ref, biases_ref = reference(config, batch)
    moved = max(float(b.abs().max()) for b in biases_ref[-1].values())
    assert moved > 0, "the reference bias never moved: the check would prove nothing"
    results = {}
    for strategy in ("ddp", "fsdp2"):
        t0 = time.perf_counter()
        dcfg = DistributedConfig(engine="native", strategy=strategy)
        info = init_distributed(dcfg)
        model = build_model(config, seed=0)
        engine = build_engine(model, dcfg)
        engine.setup_optimizer(lib.build_optimizer)
        shard = lib.shard_for_dp(batch, info.dp_rank, info.dp_size)
        losses, loads = [], []
        for step in range(STEPS):
            result = engine.forward_backward(shard, lib.loss_fn)
            losses.append(result.loss)
            engine.clip_grad_norm(None)
            engine.optimizer_step()
            engine.zero_grad()
            metrics = engine.update_expert_bias()
            loads.append(metrics["moe/layers.1.load_max"])
            # Every rank holds the same (replicated) bias, equal to the reference's after this step.
            lib.compare(f"{strategy} bias step {step}", _biases(model), biases_ref[step], tol=0.0)
        assert result.aux_loss is not None and result.aux_loss > 0
        r = {"loss": lib.compare_losses(f"{strategy} loss", losses, losses_ref),
             "param": lib.compare(f"{strategy} params", engine.full_model_state_dict(), params_ref,
                                  tol=lib.PARAM_TOL),
             "bias_max_abs": moved, "load_max": loads, "seconds": time.perf_counter() - t0}
        results[strategy] = r
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

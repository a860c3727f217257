"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: the DeepSeek-V3-shaped model
(MLA, a dense first block, shared + routed experts, sigmoid group-limited routing, aux-loss-free
expert bias) on megatron layouts against a single-process ct-model reference: losses per step,
gradients of step 0, weights after the steps and every router's expert bias after each update.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_megatron_moe_checks.py OUT_JSON [layout ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model, presets
from ct_model.moe import update_expert_bias
from ct_parallel import DistributedConfig, build_engine, init_distributed

STEPS = 3
LAYOUTS = {
    # megatron's MoE trains under TP only with sequence parallelism.
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
    "dp2": dict(),
    # MLA without MoE under TP without SP (MoE needs SP under TP): the latent-norm and RoPE-key
    # gradient paths that SP does not take.
    "tp2_dense_mla": dict(tensor_model_parallel_size=2),
}
MODEL_OVERRIDES = {"tp2_dense_mla": dict(num_moe_experts=None)}


def moe_config(**overrides):
    # deepseek_v3_tiny's structure (4 layers, the first dense, 8 experts in 4 groups, top-2 of 2
    # groups: a group scores its best two, where megatron's own rule would take topk // group_topk
    # = 1) at test size; a bias update rate large enough to change routing within the run.
    return presets.get("deepseek_v3_tiny", hidden_size=64, ffn_hidden_size=96, vocab_size=256,
                       moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, q_lora_rank=32,
                       kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                       moe_router_bias_update_rate=0.05, max_position_embeddings=64, **overrides)


def _biases(state) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items() if k.endswith("expert_bias")}


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))


def reference(config, batch):
    """One process: CE sum / global tokens, AdamW, then ct_model.moe.update_expert_bias."""
    model = build_model(config, seed=0).train()
    opt = lib.build_optimizer(list(model.named_parameters()))
    tokens = sum(int((mb["labels"] != -100).sum()) for mb in batch)
    losses, grads, biases, metrics = [], None, [], []
    for step in range(STEPS):
        total = 0.0
        for mb in batch:
            loss = lib.loss_fn(mb, model(mb["input_ids"], mb["position_ids"], mb["document_ids"]))
            (loss / tokens).backward()
            total += loss.item()
        losses.append(total / tokens)
        if step == 0:
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
        metrics.append({"moe/" + k.replace(".mlp.gate.", "."): v for k, v in update_expert_bias(model).items()})
        biases.append(_biases(model.state_dict()))
    return losses, grads, {k: v.detach().clone() for k, v in model.state_dict().items()}, biases, metrics


def check_layout(name, config, batch, ref, results):
    losses_ref, grads_ref, params_ref, biases_ref, metrics_ref = ref
    t0 = time.perf_counter()
    dcfg = DistributedConfig(engine="megatron", **LAYOUTS[name])
    info = init_distributed(dcfg)
    model = build_model(config, seed=0)
    engine = build_engine(model, dcfg)
    lib.compare(f"{name} bridge", engine.full_model_state_dict(), model.state_dict(), tol=0.0)
    engine.setup_optimizer(lib.build_optimizer)
    shard = lib.shard_for_dp(batch, info.dp_rank, info.dp_size)
    losses, grads, bias_worst, norm, load_worst = [], None, 0.0, None, 0.0
    for step in range(STEPS):
        losses.append(engine.forward_backward(shard, lib.loss_fn).loss)
        if step == 0:
            grads = engine.full_grad_state_dict()
        step_norm = engine.clip_grad_norm(None)
        norm = step_norm if norm is None else norm
        engine.optimizer_step()
        engine.zero_grad()
        # The per-layer load figures the trainer logs (the native engine's, from the same loads).
        figures = engine.update_expert_bias()
        if set(figures) != set(metrics_ref[step]):
            raise AssertionError(f"{name} load figures: {sorted(figures)} vs {sorted(metrics_ref[step])}")
        load_worst = max([load_worst] + [abs(figures[k] - v) for k, v in metrics_ref[step].items()])
        state = engine.full_model_state_dict()
        if state is not None and biases_ref[step]:
            bias_worst = max(bias_worst, lib.compare(f"{name} expert bias step {step}", _biases(state),
                                                     biases_ref[step]))
    out = {"loss": lib.compare_losses(f"{name} loss", losses, losses_ref),
           "grad": lib.compare(f"{name} grads", grads, grads_ref),
           "param": lib.compare(f"{name} params", engine.full_model_state_dict(), params_ref, tol=lib.PARAM_TOL),
           "bias": bias_worst, "load_figures": load_worst, "norm": abs(norm - _norm(grads_ref)) / _norm(grads_ref), "seconds": time.perf_counter() - t0}
    results[name] = out
    return engine


def reload_at_ep1(engine, config, batch, ckpt_dir, results):
    """Save the trained EP=2 engine; reload at EP=1 (DP=2) and at PP=2: weights (expert bias
    included) and loss equal the trained model's, run as a ct-model."""
    engine.save_checkpoint(ckpt_dir)
    obj = [engine.full_model_state_dict()]
    dist.broadcast_object_list(obj, src=0)
    trained = obj[0]
    ct = build_model(config, seed=0)
    ct.load_state_dict(trained)
    want = sum(lib.loss_fn(mb, ct(mb["input_ids"], mb["position_ids"], mb["document_ids"])).item()
               for mb in batch) / sum(int((mb["labels"] != -100).sum()) for mb in batch)
    for other in ("dp2", "pp2"):
        dcfg = DistributedConfig(engine="megatron", **LAYOUTS.get(other, {}))
        init_distributed(dcfg)
        fresh = build_engine(build_model(config, seed=1), dcfg)
        fresh.setup_optimizer(lib.build_optimizer)
        fresh.load_checkpoint(ckpt_dir)
        lib.compare(f"reload ep2->{other}", fresh.full_model_state_dict(), trained, tol=0.0)
        got = fresh.forward_only(batch, lib.loss_fn).loss
        results[f"reload_ep2_{other}"] = {"loss": abs(got - want) / want}
        assert abs(got - want) / want < lib.TOL, (other, got, want)


def unsupported_errors(config) -> dict[str, str]:
    """What megatron cannot express exactly fails naming the field: {field: message}."""
    from ct_parallel.megatron.model import UnsupportedModelError, transformer_config

    cases = {
        "rope_style": (dict(rope_style="rotate_half"), {}),
        "moe_router_score_function": (dict(moe_router_score_function="softmax", moe_router_enable_expert_bias=False),
                                      {}),
        "moe_aux_loss_coeff": (dict(moe_aux_loss_coeff=0.01), {}),
        "sequence_parallel": ({}, dict(tensor_model_parallel_size=2)),
        "num_moe_experts": (dict(num_moe_experts=6, moe_router_num_groups=3), dict(expert_model_parallel_size=4)),
    }
    out = {}
    for field, (model_changes, layout) in cases.items():
        try:
            transformer_config(config.replace(**model_changes), DistributedConfig(engine="megatron", **layout))
        except UnsupportedModelError as err:
            out[field] = str(err)
        else:
            out[field] = "no error"
    return out


def main():
    out_path, *names = sys.argv[1:]
    names = names or list(LAYOUTS)
    config = moe_config()
    batch = lib.global_batch(config)
    ref = reference(config, batch)
    moved = max(float(b.abs().max()) for b in ref[3][-1].values())
    assert moved > 0, "the reference bias never moved: the check would prove nothing"
    results = {"bias_moved": moved, "errors": unsupported_errors(config)}
    for name in names:
        if name in MODEL_OVERRIDES:
            other = moe_config(**MODEL_OVERRIDES[name])
            check_layout(name, other, batch, reference(other, batch), results)
        else:
            engine = check_layout(name, config, batch, ref, results)
            if name == "ep2":
                reload_at_ep1(engine, config, batch, out_path + ".ckpt", results)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

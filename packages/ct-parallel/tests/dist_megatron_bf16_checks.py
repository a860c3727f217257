"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: precision=bf16 on megatron
layouts WITHOUT the distributed optimizer (bf16 Float16Module chunks, megatron's
Float16OptimizerWithFloat16Params stepping fp32 main copies) against the single-process native
bf16 engine (fp32 parameters, bf16 autocast): losses of 3 steps, step-0 gradients, weight updates.
Per layout it also records the dtype of the logits the loss received (megatron keeps them in bf16
and upcasts inside its cross-entropy, as GPTModel's own loss does), and the TransformerConfig's
precision fields.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_megatron_bf16_checks.py OUT_JSON CKPT_DIR [layout ...]

Layouts: tp2 (also saves and reloads a checkpoint), pp2, pp2_interleaved; default: all.
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
from ct_precision import PrecisionConfig

BF16 = PrecisionConfig(dtype="bf16", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16")
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    # Stage 0 sends bf16 activations to stage 1: the p2p buffers must be bf16 (pipeline_dtype).
    "pp2": dict(pipeline_model_parallel_size=2),
    "pp2_interleaved": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                            pipeline_schedule="interleaved"),
}


def reference(config, batch):
    engine = build_engine(build_model(config, seed=0), DistributedConfig(), precision=BF16)
    grads = lambda: {k: p.grad.detach().clone() for k, p in engine.model.named_parameters()}  # noqa: E731
    return lib.run_engine(engine, batch, grads_fn=grads)


def bf16_noise(config, batch, ref) -> dict:
    """How far bf16 itself moves the native engine from fp32 (ct-model, one process): the scale
    the megatron bf16 differences are judged by."""
    losses32, grads32, params32 = lib.reference(config, batch)
    losses, grads, params = ref
    init = build_model(config, seed=0).state_dict()
    matrices = [k for k in init if init[k].dim() >= 2]
    return {"loss": lib.compare_losses("bf16 noise loss", losses, losses32, tol=1.0),
            "grad": lib.compare("bf16 noise grads", grads, grads32, tol=1.0),
            "update": lib.compare("bf16 noise updates", updates({k: params[k] for k in matrices}, init),
                                  updates({k: params32[k] for k in matrices}, init), tol=1.0)}


def updates(params: dict, init: dict) -> dict:
    return {k: params[k].float() - init[k].float() for k in params}


def dtype_probe(loss_fn, seen: set):
    """``loss_fn`` (taking what it takes, so the engine routes it the same way) that records the
    dtype of the logits the engine hands it, or of the vocabulary shard megatron's CE gets."""
    from ct_model.loss import Loss

    class Probe(Loss):
        inputs = loss_fn.inputs

        def from_logits(self, mb, logits):
            seen.add(str(logits.dtype))
            return loss_fn.from_logits(mb, logits)

        def from_vocab_shards(self, mb, local, shard):
            seen.add(str(local.dtype))
            return loss_fn.from_vocab_shards(mb, local, shard)

    return Probe()


def softmax_in_fp32(engine) -> bool:
    """Whether every attention softmax upcasts its bf16 scores (what attention_softmax_in_fp32
    asks): FusedScaleMaskSoftmax decides from config.bf16 as it is built."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax

    found = [m for chunk in engine.chunks for m in chunk.modules() if isinstance(m, FusedScaleMaskSoftmax)]
    return bool(found) and all(m.input_in_float16 and m.softmax_in_fp32 for m in found)


def attention_bytes_per_score(engine, mb) -> float:
    """What the local spec's attention saves for backward, in bytes per attention score (one row,
    head, query, key), measured on one bf16 training forward of this rank's chunk: the tensors
    saved with one score per element ([B, heads, T, T] and [B * heads, T, T]), counted once each."""
    from megatron.core import parallel_state as ps

    from ct_parallel.megatron.engine import model_inputs

    b, t = mb["input_ids"].shape
    saved: dict[int, torch.Tensor] = {}

    def pack(x):
        saved[x.untyped_storage().data_ptr()] = x
        return x

    args, kwargs = model_inputs(mb, engine.thd)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        engine.chunks[0](*args, **kwargs, fp32_output=False)
    heads = engine.model_config.num_attention_heads // ps.get_tensor_model_parallel_world_size()
    layers = len(engine.chunks[0].module.module.decoder.layers)
    scores = b * heads * t * t
    per_score = [x for x in saved.values() if x.shape[-2:] == (t, t) and x.numel() == scores]
    return sum(x.numel() * x.element_size() for x in per_score) / (scores * layers)


def logits_dtype_into_ce(engine, batch) -> list[str]:
    """The dtypes of the logits that reach the marked CE: wraps megatron's vocab-parallel CE
    (where the marked loss goes) and the loss itself (where it is called directly)."""
    from ct_parallel.megatron import engine as engine_mod

    seen: set = set()
    original = engine_mod.tensor_parallel.vocab_parallel_cross_entropy

    def recorded(logits, *args, **kwargs):
        seen.add(str(logits.dtype))
        return original(logits, *args, **kwargs)

    engine_mod.tensor_parallel.vocab_parallel_cross_entropy = recorded
    try:
        engine.forward_only(batch, dtype_probe(lib.loss_fn, seen))
    finally:
        engine_mod.tensor_parallel.vocab_parallel_cross_entropy = original
    everywhere: list = [None] * dist.get_world_size()  # under PP only the last stage computes the loss
    dist.all_gather_object(everywhere, seen)
    return sorted(set().union(*everywhere))


def check_layout(name, config, batch, init, ref, ckpt_dir):
    losses_ref, grads_ref, params_ref = ref
    t0 = time.perf_counter()
    dcfg = DistributedConfig(engine="megatron", **LAYOUTS[name])
    init_distributed(dcfg)
    engine = build_engine(build_model(config, seed=0), dcfg, precision=BF16)
    c = engine.config
    result = {"config": {"bf16": c.bf16, "params_dtype": str(c.params_dtype), "pipeline_dtype": str(c.pipeline_dtype)},
              "softmax_in_fp32": softmax_in_fp32(engine),
              "param_dtype": str(next(engine.chunks[0].parameters()).dtype),
              "logits_dtypes": logits_dtype_into_ce(engine, batch)}
    if name == "tp2":
        # T = 24, unlike head_dim (16): a [B * heads, T, head_dim] query is not counted as scores.
        result["attention_bytes_per_score"] = attention_bytes_per_score(engine, lib.global_batch(config, 1, t=24)[0])
    losses, grads, params = lib.run_engine(engine, batch, grads_fn=engine.full_grad_state_dict)
    result["optimizer"] = type(engine.megatron_optimizer).__name__
    result["loss"] = lib.compare_losses(f"bf16 {name} loss", losses, losses_ref, tol=1.0)
    if params is not None:
        result["grad"] = lib.compare(f"bf16 {name} grads", grads, grads_ref, tol=1.0)
        # Matrices: the 3-step AdamW update. Norm weights (~1.0) are held in bf16 by Float16Module,
        # whose spacing there (2^-7) exceeds 3 steps of lr 1e-3: compare them in bf16 ulps.
        matrices = [k for k in init if init[k].dim() >= 2]
        result["update"] = lib.compare(f"bf16 {name} updates", updates({k: params[k] for k in matrices}, init),
                                       updates({k: params_ref[k] for k in matrices}, init), tol=1.0)
        result["norm_ulps"] = max(float((params[k].float() - params_ref[k].float()).abs().max()) / 2 ** -7
                                  for k in init if init[k].dim() == 1)
    if name == "tp2":
        # The checkpoint (bf16 weights + fp32 main params in the optimizer) reloads into a fresh engine.
        engine.save_checkpoint(ckpt_dir)
        fresh = build_engine(build_model(config, seed=1), dcfg, precision=BF16)
        fresh.setup_optimizer(lib.build_optimizer)
        fresh.load_checkpoint(ckpt_dir)
        reloaded = fresh.full_model_state_dict()
        if reloaded is not None:
            result["reload"] = lib.compare("bf16 tp2 reload", reloaded, params, tol=1.0)
    result["seconds"] = time.perf_counter() - t0
    return result


def main():
    out_path, ckpt_dir, *names = sys.argv[1:]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    init = build_model(config, seed=0).state_dict()
    ref = reference(config, batch)
    results = {"noise": bf16_noise(config, batch, ref)}
    for name in names or list(LAYOUTS):
        # init_distributed re-creates megatron's parallel state for each layout in this process.
        results[name] = check_layout(name, config, batch, init, ref, ckpt_dir)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

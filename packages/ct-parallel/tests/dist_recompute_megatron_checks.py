"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: megatron TP=2 and PP=2 with
activation_checkpointing full / selective (megatron's recompute_granularity) against the same
layout without recompute (losses, step-0 gradients and weights after the steps, <= EXACT relative)
and against the single-process ct-model reference (loss and gradients, <= 1e-5).

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_recompute_megatron_checks.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_parallel import ActivationCheckpointConfig

LAYOUTS = {"tp2": dict(tensor_model_parallel_size=2), "pp2": dict(pipeline_model_parallel_size=2)}
# (layout, mode, every_n_blocks) -> the TransformerConfig fields megatron must run with, and how
# many more times than without recompute (layer forwards, core-attention forwards) run.
CASES = {
    ("tp2", "full", 1): (("full", "uniform", 1), (2.0, 2.0)),
    ("tp2", "selective", 1): (("selective", None, None), (1.0, 2.0)),
    ("pp2", "full", 1): (("full", "uniform", 1), (2.0, 2.0)),
    ("pp2", "selective", 1): (("selective", None, None), (1.0, 2.0)),
    ("pp2", "full", 2): (("full", "block", 1), (1.5, 1.5)),  # 2 layers per stage, 1 recomputed
}


EXACT = 1e-6  # recompute reruns the same kernels on the same inputs: equal up to reduction order
STEPS = 2


def count_calls(engine) -> dict[str, int]:
    """Forward calls of this rank's transformer layers and core attentions (recompute reruns them)."""
    counts = {"layer": 0, "attention": 0}

    def counter(key):
        def hook(*_):
            counts[key] += 1
        return hook

    for chunk in engine.chunks:
        for module in chunk.modules():
            if type(module).__name__ == "TransformerLayer":
                module.register_forward_hook(counter("layer"))
                module.self_attention.core_attention.register_forward_hook(counter("attention"))
    return counts


def run(config, batch, layout, ac):
    dcfg = DistributedConfig(engine="megatron", **LAYOUTS[layout])
    info = init_distributed(dcfg)
    engine = build_engine(build_model(config, seed=0), dcfg, activation_checkpointing=ac)
    c = engine.config
    fields = (c.recompute_granularity, c.recompute_method, c.recompute_num_layers)
    calls = count_calls(engine)
    out = lib.run_engine(engine, lib.shard_for_dp(batch, info.dp_rank, info.dp_size), steps=STEPS,
                         grads_fn=engine.full_grad_state_dict)
    return fields, calls, out


def main():
    out_path = sys.argv[1]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    ref_losses, ref_grads, _ = lib.reference(config, batch, steps=STEPS)
    results, baselines, base_calls = {}, {}, {}
    for layout in LAYOUTS:
        fields, base_calls[layout], baselines[layout] = run(config, batch, layout, ActivationCheckpointConfig())
        assert fields == (None, None, None), fields
    for (layout, mode, every), (want_fields, want_ratios) in CASES.items():
        t0 = time.perf_counter()
        fields, calls, (losses, grads, params) = run(config, batch, layout, ActivationCheckpointConfig(mode, every))
        assert fields == want_fields, (layout, mode, every, fields)
        ratios = tuple(calls[k] / base_calls[layout][k] for k in ("layer", "attention"))
        assert ratios == want_ratios, (layout, mode, every, calls, base_calls[layout])
        base_losses, base_grads, base_params = baselines[layout]
        name = f"{layout}_{mode}_{every}"
        results[name] = {"recompute_ratios": ratios,
                         "loss": lib.compare_losses(f"{name} loss", losses, base_losses, tol=EXACT),
                         "grad": lib.compare(f"{name} grads", grads, base_grads, tol=EXACT),
                         "param": lib.compare(f"{name} params", params, base_params, tol=EXACT),
                         "loss_vs_ct": lib.compare_losses(f"{name} loss vs ct", losses, ref_losses),
                         "grad_vs_ct": lib.compare(f"{name} grads vs ct", grads, ref_grads),
                         "seconds": time.perf_counter() - t0}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

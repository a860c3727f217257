"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: every layout builds the
model on the meta device and materialises only its own part from a weight source, and ends up
with exactly the weights a single process builds whole (the same seed: ct_model.init), or those
of an HF export read a slice at a time.

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_meta_build_checks.py OUT_JSON HF_DIR
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_model.hf import HFWeights
from ct_model.init import SeededInit
from ct_parallel import DistributedConfig, build_engine, init_distributed
from dist_megatron_moe_checks import moe_config

LAYOUTS = {
    "ddp": dict(engine="native", strategy="ddp"),
    "fsdp2": dict(engine="native", strategy="fsdp2"),
    "megatron_tp2": dict(engine="megatron", tensor_model_parallel_size=2),
    "megatron_pp2": dict(engine="megatron", pipeline_model_parallel_size=2),
}
MOE_LAYOUTS = {
    "moe_fsdp2": dict(engine="native", strategy="fsdp2"),
    "moe_megatron_ep2": dict(engine="megatron", expert_model_parallel_size=2),
}


def built_on_meta(config, layout: dict, weights_for) -> dict | None:
    dcfg = DistributedConfig(**layout)
    init_distributed(dcfg)
    model = build_model(config, device="meta")
    engine = build_engine(model, dcfg, weights=weights_for(model))
    return engine.full_model_state_dict()


def check(name, config, layout, weights_for, want) -> float:
    got = built_on_meta(config, layout, weights_for)
    return 0.0 if got is None else lib.compare(f"{name} weights", got, want, tol=0.0)


def main():
    out_path, hf_dir = sys.argv[1:]
    results = {}
    for configs, layouts in ((lib.tiny_config(), LAYOUTS), (moe_config(), MOE_LAYOUTS)):
        want = build_model(configs, seed=7).state_dict()
        for name, layout in layouts.items():
            results[name] = check(name, configs, layout, lambda m: SeededInit(m, 7), want)
    # An HF export read back a slice at a time (FSDP2 reads only its rows).
    exported = HFWeights(hf_dir)
    want = {k: exported.full(k) for k in exported.names()}
    for name in ("fsdp2", "megatron_tp2"):
        results[f"hf_{name}"] = check(f"hf {name}", exported.config, LAYOUTS[name], lambda m: exported, want)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()

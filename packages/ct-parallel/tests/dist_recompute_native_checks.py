"""Run under torchrun (2 processes, gloo): DDP and FSDP2 with activation_checkpointing full and
selective (and FSDP2 + selective + per-block compile) against the single-process ct-model
reference without checkpointing or compile.

    torchrun --nproc-per-node 2 dist_recompute_native_checks.py OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_parallel import ActivationCheckpointConfig, CompileConfig
from ct_parallel.activation_checkpoint import is_checkpointed

STEPS = 2
# (strategy, mode, compile backend or None). aot_eager: dynamo + AOTAutograd without inductor's
# C++ build, which takes minutes on CPU.
CASES = [("ddp", "full", None), ("ddp", "selective", None), ("fsdp2", "full", None),
         ("fsdp2", "selective", None), ("fsdp2", "selective", "aot_eager")]


def full_grads(model, rank):
    out = {}
    for k, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[k] = g.detach().clone()
    return out if rank == 0 else None


def main():
    out_path = sys.argv[1]
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    losses_ref, grads_ref, params_ref = lib.reference(config, batch, steps=STEPS)
    results = {}
    for strategy, mode, backend in CASES:
        t0 = time.perf_counter()
        dcfg = DistributedConfig(engine="native", strategy=strategy)
        info = init_distributed(dcfg)
        model = build_model(config, seed=0)
        compile_config = CompileConfig(enabled=backend is not None, backend=backend or "inductor")
        engine = build_engine(model, dcfg, activation_checkpointing=ActivationCheckpointConfig(mode=mode),
                              compile=compile_config)
        assert all(is_checkpointed(b) == mode for b in model.layers), [type(b) for b in model.layers]
        shard = lib.shard_for_dp(batch, info.dp_rank, info.dp_size)
        calls = [0]
        if backend is None:  # (a Python side effect inside a compiled block would break the graph)
            # A pre-hook: the recompute stops early inside the MLP (down_proj's output is not
            # needed), so the MLP's forward never returns there and a post-hook would not fire.
            model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        losses, grads, params = lib.run_engine(engine, shard, steps=STEPS,
                                               grads_fn=lambda: full_grads(model, info.rank))
        # Full and selective both rerun the block's Python forward in backward (selective
        # then takes matmul/attention outputs from its cache).
        assert backend is not None or calls[0] == 2 * len(shard) * STEPS, (strategy, mode, calls)
        name = f"{strategy}_{mode}" + (f"_compile_{backend}" if backend else "")
        # Checkpoint keys stay those of the plain model (no wrapper prefix).
        if params is not None:
            assert list(params) == list(params_ref), sorted(set(params) ^ set(params_ref))
        results[name] = {"loss": lib.compare_losses(f"{name} loss", losses, losses_ref),
                         "grad": lib.compare(f"{name} grads", grads, grads_ref),
                         "param": lib.compare(f"{name} params", params, params_ref),
                         "seconds": time.perf_counter() - t0}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

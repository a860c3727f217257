"""Run under torchrun (2 processes, gloo) through megatron_cpu_run.py: every megatron layout
against the single-process ct-model reference, in one launch (megatron's import costs ~20 s).

    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_megatron_checks.py OUT_JSON CKPT_DIR [layout ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model
from ct_parallel import DistributedConfig, build_engine, init_distributed

LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    # The same layout with a loss that is not marked as cross-entropy: it gets the logits gathered
    # over the vocabulary (the KD path), where "tp2" computes CE on the vocabulary shards.
    "tp2_gathered": dict(tensor_model_parallel_size=2),
    # ... and with a loss that brings its own implementation on the vocabulary slices (the KD path).
    "tp2_on_shards": dict(tensor_model_parallel_size=2),
    "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "pp2_interleaved": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                            pipeline_schedule="interleaved"),
    "dp2": dict(),
    "dp2_distopt": dict(use_distributed_optimizer=True, overlap_grad_reduce=True),
    # Llama-style variant: rotate_half RoPE, no QK-norm, untied output layer, across PP stages.
    "pp2_llama": dict(pipeline_model_parallel_size=2),
}
MODEL_OVERRIDES = {"pp2_llama": dict(rope_style="rotate_half", qk_layernorm=False,
                                     share_embeddings_and_output_weights=False)}


def check_layout(name, config, batch, ref, results):
    losses_ref, grads_ref, params_ref = ref
    t0 = time.perf_counter()
    dcfg = DistributedConfig(engine="megatron", **LAYOUTS[name])
    info = init_distributed(dcfg)
    model = build_model(config, seed=0)
    engine = build_engine(model, dcfg)
    assert set(engine.full_model_state_dict() or model.state_dict()) == set(model.state_dict())
    # The bridge round trip alone must be exact.
    lib.compare(f"{name} bridge", engine.full_model_state_dict(), model.state_dict(), tol=0.0)
    grads_fn = None if dcfg.use_distributed_optimizer else engine.full_grad_state_dict
    loss = {"tp2_gathered": lib.gathered_loss_fn, "tp2_on_shards": lib.shard_loss_fn}.get(name, lib.loss_fn)
    losses, grads, params = lib.run_engine(engine, lib.shard_for_dp(batch, info.dp_rank, info.dp_size),
                                           grads_fn=grads_fn, loss=loss)
    out = {"loss": lib.compare_losses(f"{name} loss", losses, losses_ref)}
    if grads_fn is not None:
        out["grad"] = lib.compare(f"{name} grads", grads, grads_ref)
    out["param"] = lib.compare(f"{name} params", params, params_ref, tol=lib.PARAM_TOL)
    if params is not None:
        out["param_worst"] = sorted(((lib.rel(params[k], params_ref[k]), k) for k in params_ref), reverse=True)[:3]
    out["seconds"] = time.perf_counter() - t0
    results[name] = out
    return engine, model


def main():
    out_path, ckpt_dir, *names = sys.argv[1:]
    names = names or list(LAYOUTS)
    config = lib.tiny_config()
    batch = lib.global_batch(config)
    ref = lib.reference(config, batch)
    results = {}
    # What megatron cannot express is an explicit error naming the field.
    from ct_parallel.megatron.model import UnsupportedModelError, transformer_config

    try:
        transformer_config(lib.tiny_config(layer_sharing=True), DistributedConfig(engine="megatron"))
    except UnsupportedModelError as err:
        results["layer_sharing_error"] = {"message": str(err)}
    for name in names:
        if name in MODEL_OVERRIDES:
            cfg = lib.tiny_config(**MODEL_OVERRIDES[name])
            check_layout(name, cfg, batch, lib.reference(cfg, batch), results)
            continue
        engine, model = check_layout(name, config, batch, ref, results)
        if name == "tp2":
            # Save at TP=2 after training; reload at PP=2 and at DP=2 (TP=1): logits must equal the
            # ct-model with the trained weights.
            engine.save_checkpoint(ckpt_dir)
            trained = engine.full_model_state_dict()
            obj = [trained]
            dist.broadcast_object_list(obj, src=0)
            trained = obj[0]
            ct = build_model(config, seed=0)
            ct.load_state_dict(trained)
            for other in ("pp2", "dp2"):
                dcfg = DistributedConfig(engine="megatron", **LAYOUTS[other])
                init_distributed(dcfg)
                fresh = build_engine(build_model(config, seed=1), dcfg)
                fresh.setup_optimizer(lib.build_optimizer)
                fresh.load_checkpoint(ckpt_dir)
                lib.compare(f"reload tp2->{other}", fresh.full_model_state_dict(), trained, tol=0.0)
                got = fresh.forward_only(batch, lib.loss_fn).loss
                want = sum(lib.loss_fn(mb, ct(mb["input_ids"], mb["position_ids"], mb["document_ids"])).item()
                           for mb in batch) / sum(int((mb["labels"] != -100).sum()) for mb in batch)
                results[f"reload_tp2_{other}"] = {"loss": abs(got - want) / want}
                assert abs(got - want) / want < lib.TOL, (other, got, want)
            results["strict_load"] = {"message": _load_other_model(ckpt_dir)}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def _load_other_model(ckpt_dir) -> str:
    """The TP=2 checkpoint (4 layers) into a 2-layer model at TP=2: refused before any load, not
    the partial load megatron's default allows; returns the error's message ('' when it loaded)."""
    from ct_parallel.native import CheckpointModelMismatch

    dcfg = DistributedConfig(engine="megatron", **LAYOUTS["tp2"])
    init_distributed(dcfg)
    fewer = build_engine(build_model(lib.tiny_config(num_layers=2), seed=1), dcfg)
    fewer.setup_optimizer(lib.build_optimizer)
    try:
        fewer.load_checkpoint(ckpt_dir)
    except CheckpointModelMismatch as err:
        return str(err)
    return ""


if __name__ == "__main__":
    main()

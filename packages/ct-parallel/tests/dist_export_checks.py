"""Run under torchrun (2 processes, gloo): each engine's ``full_state_items()`` (one full tensor at a
time) against the engine's whole-state gather of before (native: torch's
``get_model_state_dict(full_state_dict=True)``; megatron: ``bridge.export_ct_state_dict``, which
gathers everything to rank 0 with gather_object) and against the weights the engine was built from;
then the same stream written by ``ct_model.hf.write_hf`` in small shards, for the pytest process to
load in transformers.

    torchrun --nproc-per-node 2 dist_export_checks.py OUT_DIR native LAYOUT...
    torchrun --nproc-per-node 2 megatron_cpu_run.py dist_export_checks.py OUT_DIR megatron LAYOUT...

Per layout, rank 0 writes OUT_DIR/LAYOUT/hf (the export), OUT_DIR/LAYOUT/state.pt (the weights the
engine was built from) and OUT_DIR/LAYOUT/result.json (names, order, largest difference).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import parallel_testlib as lib
from ct_model import build_model, presets
from ct_model.hf import write_hf
from ct_model.moe import Router
from ct_parallel import DistributedConfig, build_engine, init_distributed

MAX_SHARD = 60_000  # bytes: several shards for these tiny models

LAYOUTS = {
    "native": {
        "fsdp2": ("dense", dict(strategy="fsdp2")),
        "fsdp2_moe": ("moe", dict(strategy="fsdp2")),
        "ddp": ("dense", dict(strategy="ddp")),
    },
    "megatron": {
        "tp2": ("dense", dict(tensor_model_parallel_size=2)),
        "pp2": ("dense", dict(pipeline_model_parallel_size=2)),
        "pp2_interleaved": ("untied", dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                                           pipeline_schedule="interleaved")),
        "ep2_moe": ("moe", dict(expert_model_parallel_size=2)),
        "tp2_sp_moe": ("moe", dict(tensor_model_parallel_size=2, sequence_parallel=True)),
        "pp2_moe": ("moe", dict(pipeline_model_parallel_size=2)),
    },
}


def model_config(kind: str):
    if kind == "dense":  # mobilellm_tiny's architecture: GQA, QK-norm, interleaved RoPE, tied
        return lib.tiny_config()
    if kind == "untied":  # Llama-style: rotate-half, no QK-norm, untied output layer
        return lib.tiny_config(rope_style="rotate_half", qk_layernorm=False, share_embeddings_and_output_weights=False)
    # deepseek_v3_tiny's structure at test size (as dist_megatron_moe_checks.py)
    return presets.get("deepseek_v3_tiny", hidden_size=64, ffn_hidden_size=96, vocab_size=256,
                       moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, q_lora_rank=32,
                       kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                       max_position_embeddings=64)


def source_model(config):
    """Seeded weights with random norms and router biases (equal on every rank), so that a tensor
    mixed up with another or left at its initial value shows."""
    model = build_model(config, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
        for m in model.modules():
            if isinstance(m, Router):
                m.expert_bias.normal_(0, 0.1, generator=g)
    return model


def whole_state_reference(engine, family: str):
    """The engine's whole-state gather of before this change (rank 0; None elsewhere)."""
    if family == "native":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(engine.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else None
    from ct_parallel.megatron import bridge

    with engine._student_only():
        return bridge.export_ct_state_dict(engine.chunks, engine.model_config)


def check(family: str, layout: str, out: Path) -> None:
    kind, fields = LAYOUTS[family][layout]
    config = model_config(kind)
    dcfg = DistributedConfig(engine=family, **fields)
    init_distributed(dcfg)
    model = source_model(config)
    want = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, dcfg)
    if layout.startswith("fsdp2"):
        assert type(engine.model.embed_tokens.weight).__name__ == "DTensor", "FSDP2 did not shard"
    reference = whole_state_reference(engine, family)
    items = []
    for name, tensor in engine.full_state_items():  # every rank walks it; rank 0 receives
        assert tensor.device.type == "cpu", (name, tensor.device)
        items.append((name, tensor.clone()))
    # The stream again, straight into the HF writer on rank 0 (the others only take part).
    target = out / layout
    stream = engine.full_state_items()
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        write_hf(stream, config, target / "hf", max_shard_bytes=MAX_SHARD)
    else:
        assert next(stream, None) is None, "a rank other than 0 received tensors"
    if dist.get_rank() == 0:
        got = dict(items)
        assert len(got) == len(items), "a name came twice"
        result = {"names": [n for n, _ in items], "want": list(want), "reference": list(reference),
                  "diff_reference": max(float((got[k] - reference[k]).abs().max()) for k in reference),
                  "diff_source": max(float((got[k] - want[k]).abs().max()) for k in want if k in got),
                  "engine_full_state": engine.full_model_state_dict().keys() == got.keys()}
        torch.save(want, target / "state.pt")
        (target / "result.json").write_text(json.dumps(result, indent=1))
    else:
        assert engine.full_model_state_dict() is None
    dist.barrier()


def main():
    out, family, *layouts = sys.argv[1:]
    for layout in layouts:
        check(family, layout, Path(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

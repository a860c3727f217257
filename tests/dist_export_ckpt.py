"""Write a training checkpoint (as ct-train does: CheckpointManager, meta.json with the engine and
its layout, model_config.json beside it) from an engine of the given layout, for ct-export tests.

    torchrun --nproc-per-node 2 dist_export_ckpt.py RUN_DIR native|megatron KIND FIELD=VALUE...

RUN_DIR/checkpoints/step_00000001 is the checkpoint; RUN_DIR/state.pt the weights it holds (the
ct-model the engine was built from: seeded, with random norms and router biases).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ct_model import build_model, presets
from ct_model.moe import Router
from ct_parallel import DistributedConfig, build_engine, init_distributed
from ct_stages import CheckpointManager


def model_config(kind: str):
    if kind == "moe":  # deepseek_v3_tiny's structure at test size
        return presets.get("deepseek_v3_tiny", hidden_size=64, ffn_hidden_size=96, vocab_size=256,
                           moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, q_lora_rank=32,
                           kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                           max_position_embeddings=64)
    return presets.get("mobilellm_tiny", num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                       kv_channels=16, ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)


def source_model(config):
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


def parse(fields: list[str]) -> dict:
    out = {}
    for field in fields:
        key, value = field.split("=", 1)
        out[key] = int(value) if value.isdigit() else {"true": True, "false": False}.get(value, value)
    return out


def main():
    run_dir, family, kind, *fields = sys.argv[1:]
    run_dir = Path(run_dir)
    config = model_config(kind)
    dcfg = DistributedConfig(engine=family, **parse(fields))
    init_distributed(dcfg)
    model = source_model(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, dcfg)
    if dist.get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        torch.save(state, run_dir / "state.pt")
    manager = CheckpointManager(run_dir / "checkpoints", metadata={"engine": family, "layout": dcfg.to_dict()})
    manager.save(1, engine, {"step": 1})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":  # megatron's checkpoint writer spawns a process that imports this file
    main()

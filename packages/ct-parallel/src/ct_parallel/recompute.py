"""How each engine interprets activation checkpointing and compile (ct_precision configs).

Native engines (single, DDP, FSDP2): ``apply_activation_checkpointing`` then ``apply_compile`` on
the Decoder's blocks, before the DDP/FSDP2 wrap (FSDP2's per-block hooks then gather parameters
outside the checkpointed, compiled region, and recomputation in backward finds them gathered).

Megatron: its own recompute, through TransformerConfig:

- ``full``, every_n_blocks=1 -> recompute_granularity="full", recompute_method="uniform",
  recompute_num_layers=1: every layer keeps only its input (what native ``full`` does).
- ``full``, every_n_blocks=N>1 -> recompute_method="block", recompute_num_layers=ceil(L/N) for
  the L layers of each model chunk: megatron recomputes the first ceil(L/N) layers of a chunk
  rather than layers 0, N, 2N, ...; the same number of layers (same memory), other positions.
- ``selective`` -> recompute_granularity="selective" (recompute_modules=["core_attn"]):
  megatron recomputes the core attention (QK^T, softmax, x V) and keeps the rest. Native
  selective saves attention and matmul outputs and recomputes elementwise ops instead; the two
  coincide in intent (skip the cheap-to-recompute, large activations), not op by op.
  every_n_blocks must be 1 (megatron's selective applies to every layer).
- ``compile.enabled=true`` is refused: megatron's modules are not built for per-block compile
  here (its own fusions play that role).
"""

from __future__ import annotations

import math
from typing import Any

from ct_model import ModelConfig

from .activation_checkpoint import ActivationCheckpointConfig
from .compile import CompileConfig
from .config import DistributedConfig
from .precision import layout_name


def check_recompute_combination(ac: ActivationCheckpointConfig, compile_config: CompileConfig,
                                dist: DistributedConfig) -> None:
    """Raise ValueError naming both keys for a checkpointing/compile x layout pair that cannot run."""
    if dist.engine != "megatron":
        return
    if compile_config.enabled:
        raise ValueError(f"compile.enabled=true with {layout_name(dist)}: per-block torch.compile is for the "
                         "native engines (single, ddp, fsdp2); set compile.enabled=false")
    if ac.mode == "selective" and ac.every_n_blocks != 1:
        raise ValueError(f"activation_checkpointing.mode=selective with every_n_blocks={ac.every_n_blocks} and "
                         f"{layout_name(dist)}: megatron's selective recompute applies to every layer; "
                         "set activation_checkpointing.every_n_blocks=1")


def megatron_recompute(ac: ActivationCheckpointConfig, model_config: ModelConfig,
                       dist: DistributedConfig) -> dict[str, Any]:
    """TransformerConfig recompute fields for ``ac`` (empty: no recompute)."""
    if ac.mode == "none":
        return {}
    if ac.mode == "selective":
        return {"recompute_granularity": "selective"}
    if ac.every_n_blocks == 1:
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    virtual = dist.virtual_pipeline_model_parallel_size if dist.pipeline_schedule == "interleaved" else None
    chunks = dist.pipeline_model_parallel_size * (virtual or 1)
    per_chunk = model_config.num_layers // chunks
    return {"recompute_granularity": "full", "recompute_method": "block",
            "recompute_num_layers": math.ceil(per_chunk / ac.every_n_blocks)}

"""One entry point from a DistributedConfig to an engine."""

from __future__ import annotations

import torch
from torch import nn

from .config import DistributedConfig
from .engine import Engine
from .native import build_native_engine


def build_engine(model: nn.Module, dist_config: DistributedConfig, *,
                 autocast_dtype: torch.dtype | None = None) -> Engine:
    """Wrap (native) or rebuild (megatron) a ct-model Decoder for the configured layout.

    Call ``init_distributed(dist_config)`` first, and build the model with the same seed on every
    rank. Native: single, DDP or FSDP2 around ``model`` itself. Megatron: a GPTModel per rank
    (TP shard of its PP stage's layers) with weights copied from ``model`` by the bridge.
    """
    if dist_config.engine == "megatron":
        from .megatron.engine import build_megatron_engine  # imports megatron-core (~20 s)

        return build_megatron_engine(model, dist_config, autocast_dtype=autocast_dtype)
    if dist_config.strategy == "fsdp2":
        from .fsdp import build_fsdp2_engine

        if autocast_dtype is not None:
            raise ValueError("FSDP2 mixed precision is set by distributed.fsdp_param_dtype, not autocast_dtype")
        return build_fsdp2_engine(model, param_dtype=dist_config.fsdp_param_dtype,
                                  reduce_dtype=dist_config.fsdp_reduce_dtype,
                                  reshard_after_forward=dist_config.fsdp_reshard_after_forward)
    return build_native_engine(model, strategy=dist_config.strategy, autocast_dtype=autocast_dtype)

"""How each engine interprets ct_precision.PrecisionConfig, and which combinations are refused.

ct-parallel depends on ct-precision (not the reverse): the engine is the one place that knows both
the layout and the precision, and must act on precision at build time (FSDP2's MixedPrecisionPolicy,
FP8 conversion before sharding, megatron's bf16/fp8 TransformerConfig fields).
"""

from __future__ import annotations

import importlib.util

import torch
from ct_precision import PrecisionConfig

from .config import DistributedConfig


def layout_name(dist: DistributedConfig) -> str:
    return f"distributed.engine={dist.engine}" + (f" strategy={dist.strategy}" if dist.engine == "native" else "")


def check_combination(precision: PrecisionConfig, dist: DistributedConfig) -> None:
    """Raise ValueError naming both keys for a precision x distributed pair that cannot run."""
    both = f"precision.dtype={precision.dtype} with {layout_name(dist)}"
    if dist.engine == "megatron":
        if precision.fp8 and not (importlib.util.find_spec("transformer_engine") and torch.cuda.is_available()):
            raise ValueError(f"{both}: FP8 on the megatron engine needs Transformer Engine and CUDA")
        if precision.dtype == "bf16" and not dist.use_distributed_optimizer:
            raise ValueError(f"{both}: needs distributed.use_distributed_optimizer=true (not built yet: "
                             "bf16 with megatron's Float16Optimizer)")
        return
    if precision.fp8:
        raise ValueError(f"{both}: FP8 on the native engines (torchao) is not built yet")


def native_autocast_dtype(precision: PrecisionConfig) -> torch.dtype | None:
    """Single/DDP: fp32 master weights, forward under autocast to compute_dtype."""
    return precision.autocast_dtype


def fsdp_dtypes(precision: PrecisionConfig) -> tuple[str | None, str]:
    """FSDP2: (param_dtype or None for "keep the parameters' own dtype", reduce_dtype)."""
    param = None if precision.param_dtype == "float32" else precision.param_dtype
    return param, precision.reduce_dtype

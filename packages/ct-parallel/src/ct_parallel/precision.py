"""How each engine interprets ct_precision.PrecisionConfig, and which combinations are refused.

ct-parallel depends on ct-precision (not the reverse): the engine is the one place that knows both
the layout and the precision, and must act on precision at build time (FSDP2's MixedPrecisionPolicy,
FP8 conversion before sharding, megatron's bf16/fp8 TransformerConfig fields).
"""

from __future__ import annotations

import importlib.util

import torch
from ct_precision import PrecisionConfig
from ct_precision.fp8 import MXFP8_MIN_CAPABILITY, convert_to_fp8

from .config import DistributedConfig


def layout_name(dist: DistributedConfig) -> str:
    return f"distributed.engine={dist.engine}" + (f" strategy={dist.strategy}" if dist.engine == "native" else "")


def check_combination(precision: PrecisionConfig, dist: DistributedConfig) -> None:
    """Raise ValueError naming both keys for a precision x distributed pair that cannot run."""
    both = f"precision.dtype={precision.dtype} with {layout_name(dist)}"
    if dist.engine == "megatron":
        if not precision.fp8:
            return
        if precision.fp8_recipe not in MEGATRON_FP8_RECIPES:
            raise ValueError(f"{both}: precision.fp8_recipe={precision.fp8_recipe} has no Transformer Engine "
                             f"recipe; use one of {sorted(MEGATRON_FP8_RECIPES)}")
        if dist.transformer_impl == "local":
            raise ValueError(f"{both}: FP8 on the megatron engine runs in Transformer Engine layers; "
                             "distributed.transformer_impl=local has none")
        if not (importlib.util.find_spec("transformer_engine") and torch.cuda.is_available()):
            raise ValueError(f"{both}: FP8 on the megatron engine needs Transformer Engine and CUDA")
        return
    if precision.fp8 and precision.fp8_recipe == "mxfp8" and not _cuda_capability_at_least(MXFP8_MIN_CAPABILITY):
        raise ValueError(f"{both}: precision.fp8_recipe=mxfp8 needs a CUDA GPU with compute capability >= 10.0 "
                         "(Blackwell); use fp8_recipe=tensorwise or rowwise")


# Our recipe names -> TransformerConfig.fp8_recipe (Transformer Engine's). torchao's rowwise scaling
# has no Transformer Engine twin, so it is refused on the megatron engine rather than approximated.
MEGATRON_FP8_RECIPES = {"tensorwise": "tensorwise", "mxfp8": "mxfp8"}


def megatron_fp8_fields(precision: PrecisionConfig) -> dict:
    """TransformerConfig's FP8 fields for ``precision`` (none unless dtype=fp8): "hybrid" is
    e4m3 for activations and weights, e5m2 for gradients, as torchao's default on the native
    engines. Megatron then runs each Transformer Engine layer under TE's FP8 autocast; the output
    layer and embeddings stay in bf16 there too."""
    if not precision.fp8:
        return {}
    return {"fp8": "hybrid", "fp8_recipe": MEGATRON_FP8_RECIPES[precision.fp8_recipe]}


def _cuda_capability_at_least(need: tuple[int, int]) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= need


def prepare_native_model(model: torch.nn.Module, precision: PrecisionConfig,
                         device: torch.device | None = None) -> torch.nn.Module:
    """What the native engines do to the model itself before wrapping it: FP8 layers (torchao)
    are swapped in before DDP/FSDP2 sees the parameters, so sharding wraps the Float8Linear.
    ``device``: where it will run (the model may still be on ``meta``)."""
    return convert_to_fp8(model, precision, device) if precision.fp8 else model


def native_autocast_dtype(precision: PrecisionConfig) -> torch.dtype | None:
    """Single/DDP: fp32 master weights, forward under autocast to compute_dtype."""
    # A pass-through (issue 26): to be inlined as ``precision.autocast_dtype`` at its only callers,
    # in parallelize.py, once the loss-path rewrite that holds that file has landed.
    return precision.autocast_dtype


def fsdp_dtypes(precision: PrecisionConfig) -> tuple[str | None, str]:
    """FSDP2: (param_dtype or None for "keep the parameters' own dtype", reduce_dtype)."""
    param = None if precision.param_dtype == "float32" else precision.param_dtype
    return param, precision.reduce_dtype

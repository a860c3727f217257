"""One entry point from a DistributedConfig (+ PrecisionConfig) to an engine."""

from __future__ import annotations

from ct_precision import PrecisionConfig
from torch import nn

from .config import DistributedConfig
from .engine import Engine
from .native import build_native_engine
from .precision import check_combination, fsdp_dtypes, native_autocast_dtype, prepare_native_model


def build_engine(model: nn.Module, dist_config: DistributedConfig, *,
                 precision: PrecisionConfig | None = None) -> Engine:
    """Wrap (native) or rebuild (megatron) a ct-model Decoder for the configured layout and precision.

    Call ``init_distributed(dist_config)`` first, and build the model with the same seed on every
    rank. Native: single, DDP (autocast) or FSDP2 (MixedPrecisionPolicy) around ``model`` itself.
    Megatron: a GPTModel per rank (TP shard of its PP stage's layers) with weights copied from
    ``model`` by the bridge. A precision/layout pair that cannot run raises ValueError naming both.
    """
    precision = precision if precision is not None else PrecisionConfig()
    check_combination(precision, dist_config)
    if dist_config.engine == "megatron":
        from .megatron.engine import build_megatron_engine  # imports megatron-core (~20 s)

        return build_megatron_engine(model, dist_config, autocast_dtype=native_autocast_dtype(precision))
    model = prepare_native_model(model, precision)
    if dist_config.strategy == "fsdp2":
        from .fsdp import build_fsdp2_engine

        param_dtype, reduce_dtype = fsdp_dtypes(precision)
        return build_fsdp2_engine(model, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                  reshard_after_forward=dist_config.fsdp_reshard_after_forward)
    return build_native_engine(model, strategy=dist_config.strategy, autocast_dtype=native_autocast_dtype(precision))

"""One entry point from a DistributedConfig (+ precision, checkpointing, compile) to an engine."""

from __future__ import annotations

from ct_precision import (ActivationCheckpointConfig, CompileConfig, PrecisionConfig, apply_activation_checkpointing,
                          apply_compile)
from torch import nn

from .config import DistributedConfig
from .engine import Engine
from .native import build_native_engine
from .precision import check_combination, fsdp_dtypes, megatron_fp8_fields, native_autocast_dtype, prepare_native_model
from .recompute import check_recompute_combination, megatron_recompute


def build_engine(model: nn.Module, dist_config: DistributedConfig, *,
                 precision: PrecisionConfig | None = None,
                 activation_checkpointing: ActivationCheckpointConfig | None = None,
                 compile: CompileConfig | None = None,  # noqa: A002 - the config key's name
                 distill_teacher: nn.Module | None = None, distill_temperature: float = 1.0,
                 distill_kind: str = "forward_kl") -> Engine:
    """Wrap (native) or rebuild (megatron) a ct-model Decoder for the configured layout and precision.

    Call ``init_distributed(dist_config)`` first, and build the model with the same seed on every
    rank. Native: FP8 layers, activation checkpointing, then per-block compile, applied to ``model``'s blocks
    in place, then single, DDP (autocast) or FSDP2 (MixedPrecisionPolicy) around ``model`` itself.
    Megatron: a GPTModel per rank (TP shard of its PP stage's layers) with weights copied from
    ``model`` by the bridge, with megatron's own recompute (see recompute.py). A pair of settings
    that cannot run raises ValueError naming both keys. ``distill_teacher`` (megatron only): KD
    through nvidia-modelopt (``stage.distill.backend=modelopt``; megatron/modelopt_kd.py).
    """
    precision = precision if precision is not None else PrecisionConfig()
    ac = activation_checkpointing if activation_checkpointing is not None else ActivationCheckpointConfig()
    compile_config = compile if compile is not None else CompileConfig()
    unsupported = dist_config.engine_support_errors()
    if unsupported:
        raise ValueError(unsupported[0])
    check_combination(precision, dist_config)
    check_recompute_combination(ac, compile_config, dist_config)
    if dist_config.engine == "megatron":
        from .megatron.engine import build_megatron_engine  # imports megatron-core (~20 s)

        return build_megatron_engine(model, dist_config, autocast_dtype=native_autocast_dtype(precision),
                                     recompute=megatron_recompute(ac, model.config, dist_config),
                                     fp8=megatron_fp8_fields(precision), distill_teacher=distill_teacher,
                                     distill_temperature=distill_temperature, distill_kind=distill_kind)
    if distill_teacher is not None:
        raise ValueError(f"stage.distill.backend=modelopt needs distributed.engine=megatron, got "
                         f"distributed.engine={dist_config.engine!r}")
    # Before the wrap, in torchtitan's order (FP8 layers, then checkpointing, then compile): FSDP2/DDP
    # then see the same parameters under the same names.
    model = prepare_native_model(model, precision)
    apply_activation_checkpointing(model, ac)
    apply_compile(model, compile_config)
    if dist_config.strategy == "fsdp2":
        from .fsdp import build_fsdp2_engine

        param_dtype, reduce_dtype = fsdp_dtypes(precision)
        return build_fsdp2_engine(model, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                  reshard_after_forward=dist_config.fsdp_reshard_after_forward)
    return build_native_engine(model, strategy=dist_config.strategy, autocast_dtype=native_autocast_dtype(precision))

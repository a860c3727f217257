"""The parallelize step: a ct-model Decoder built on ``meta`` in, a running engine out.

In torchtitan's order, and in one place:

1. validation of the precision x layout x recompute choice (once, here);
2. native engines: FP8 linears (torchao), activation checkpointing, per-block compile, applied to
   the blocks in place while the model is still on ``meta`` (no memory yet); then FSDP2's
   ``fully_shard`` (on ``meta`` too) or, for single/DDP, nothing;
3. materialisation: ``to_empty`` on the device, then every parameter filled from the weight
   source (fresh initial values, ct_model.init; or an HF directory, ct_model.hf.HFWeights) with
   exactly the part this rank holds: FSDP2 reads only its rows of each parameter, so no process
   ever holds the full model, only its shards plus one parameter at a time;
4. the engine around it (DDP is wrapped only now: it broadcasts real parameters).

The megatron engine is handed the configuration and the weight source instead: each rank builds
only its own chunks (its pipeline stage's layers, its tensor-parallel slice) and the bridge fills
them from the source one parameter at a time.

A model that is already materialised (tests, benchmarks) goes through the same steps with
nothing to materialise.
"""

from __future__ import annotations

import torch
from ct_model.loss import Loss
from ct_model.weights import WeightSource, load_into
from ct_precision import PrecisionConfig
from torch import nn

from .activation_checkpoint import ActivationCheckpointConfig, apply_activation_checkpointing
from .compile import CompileConfig, apply_compile
from .config import DistributedConfig
from .engine import Engine
from .native import NativeEngine, build_native_engine
from .precision import check_combination, fsdp_dtypes, megatron_fp8_fields, prepare_native_model
from .recompute import check_recompute_combination, megatron_recompute


def on_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def parallelize(model: nn.Module, dist_config: DistributedConfig, *, precision: PrecisionConfig,
                activation_checkpointing: ActivationCheckpointConfig, compile: CompileConfig,  # noqa: A002
                weights: WeightSource | None = None, device: torch.device | None = None,
                loss: Loss | None = None) -> Engine:
    """See the module docstring. ``weights``: required for a ``meta`` model (else its own values are
    used); ``device``: where it runs (default: the current CUDA device, else the CPU, or where a
    materialised model already is)."""
    check_settings(dist_config, precision, activation_checkpointing, compile)
    if on_meta(model) and weights is None:
        raise ValueError("a model on the meta device needs a weight source (ct_model.init.SeededInit or "
                         "ct_model.hf.HFWeights) to be materialised from")
    if device is None:
        device = default_device() if on_meta(model) else next(model.parameters()).device
    if dist_config.engine == "megatron":
        from .megatron.engine import MegatronEngine  # imports megatron-core (~20 s)

        return MegatronEngine(model, dist_config, autocast_dtype=precision.autocast_dtype,
                              recompute=megatron_recompute(activation_checkpointing, model.config, dist_config),
                              fp8=megatron_fp8_fields(precision), weights=weights,
                              engine_teacher=loss.engine_teacher if loss is not None else None)
    if loss is not None and loss.engine_teacher is not None:
        raise ValueError(f"stage.distill.backend=modelopt needs distributed.engine=megatron, got "
                         f"distributed.engine={dist_config.engine!r}")
    # Before the wrap, in torchtitan's order (FP8 layers, then checkpointing, then compile): FSDP2/DDP
    # then see the same parameters under the same names.
    model = prepare_native_model(model, precision, device)
    apply_activation_checkpointing(model, activation_checkpointing)
    apply_compile(model, compile)
    if dist_config.strategy == "fsdp2":
        from .fsdp import FSDP2Engine, shard_fsdp2

        param_dtype, reduce_dtype = fsdp_dtypes(precision)
        mesh = shard_fsdp2(model, device, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                           reshard_after_forward=dist_config.fsdp_reshard_after_forward)
        materialize(model, weights, device)
        return FSDP2Engine(model, model, dp_group=mesh.get_group())
    materialize(model, weights, device)
    engine: NativeEngine = build_native_engine(model, strategy=dist_config.strategy,
                                               autocast_dtype=precision.autocast_dtype)
    return engine


def check_settings(dist_config: DistributedConfig, precision: PrecisionConfig,
                   ac: ActivationCheckpointConfig, compile_config: CompileConfig) -> None:
    """Every refusal of a layout or a setting combination, before anything is built (ValueError
    naming the keys). ct-train calls it first thing too (ct_stages.run.check_supported), so a
    run is refused before any data or model work; build_engine calls it for every other caller."""
    unsupported = dist_config.engine_support_errors()
    if unsupported:
        raise ValueError(unsupported[0])
    check_combination(precision, dist_config)
    check_recompute_combination(ac, compile_config, dist_config)


@torch.no_grad()
def materialize(model: nn.Module, weights: WeightSource | None, device: torch.device) -> None:
    """Give a ``meta`` model (its blocks possibly FSDP2-sharded) storage on ``device`` and fill it
    from ``weights``; a materialised model is loaded from ``weights`` when given, else left as is."""
    if on_meta(model):
        model.to_empty(device=device)
    if weights is not None:
        load_into(model, weights)


"""One entry point from a DistributedConfig (+ precision, checkpointing, compile) to an engine.

The work is the parallelize step (parallelize.py); this keeps the public name and its defaults."""

from __future__ import annotations

import torch
from ct_model.loss import Loss
from ct_model.weights import WeightSource
from ct_precision import PrecisionConfig
from torch import nn

from .activation_checkpoint import ActivationCheckpointConfig
from .compile import CompileConfig
from .config import DistributedConfig
from .engine import Engine
from .parallelize import parallelize


def build_engine(model: nn.Module, dist_config: DistributedConfig, *,
                 precision: PrecisionConfig | None = None,
                 activation_checkpointing: ActivationCheckpointConfig | None = None,
                 compile: CompileConfig | None = None,  # noqa: A002 - the config key's name
                 weights: WeightSource | None = None, device: torch.device | None = None,
                 loss: Loss | None = None) -> Engine:
    """Wrap (native) or rebuild (megatron) a ct-model Decoder for the configured layout and precision.

    Call ``init_distributed(dist_config)`` first. ``model``: built on the ``meta`` device (nothing
    allocated) with ``weights`` saying what fills it (``ct_model.init.SeededInit(model, seed)`` for
    fresh weights, ``ct_model.hf.HFWeights(dir)`` for an export): each rank then materialises only
    what it holds. A materialised model (the same seed on every rank) works too. Native: FP8
    layers, activation checkpointing, per-block compile, then single, DDP (autocast) or FSDP2
    (MixedPrecisionPolicy). Megatron: a GPTModel per rank (TP shard of its PP stage's layers)
    filled by the bridge, with megatron's own recompute (see recompute.py). A pair of settings
    that cannot run raises ValueError naming both keys. ``loss``: the loss the engine will train,
    needed here only by a loss whose teacher the engine must hold (``loss.engine_teacher``:
    nvidia-modelopt KD, ``stage.distill.backend=modelopt``, megatron only; megatron/modelopt_kd.py).
    """
    return parallelize(model, dist_config, precision=precision if precision is not None else PrecisionConfig(),
                       activation_checkpointing=activation_checkpointing or ActivationCheckpointConfig(),
                       compile=compile if compile is not None else CompileConfig(),
                       weights=weights, device=device, loss=loss)

"""ct_parallel: engines (native single/DDP/FSDP2, megatron-core), process groups, weight bridge.

Trainer API: ``info = init_distributed(cfg)``; build the ct-model on ``meta``;
``engine = build_engine(model, cfg, precision=..., activation_checkpointing=..., compile=...,
weights=..., device=info.device, loss=...)`` (the parallelize step: parallelize.py); then
``engine.setup_optimizer(build)``, ``forward_backward`` / ``clip_grad_norm`` / ``optimizer_step`` /
``zero_grad`` per step and ``save_checkpoint`` / ``load_checkpoint`` / ``full_model_state_dict``. Importing this package
does not import megatron-core; only ``engine: megatron`` does.
"""

from .activation_checkpoint import ActivationCheckpointConfig, apply_activation_checkpointing
from .compile import CompileConfig, apply_compile, resolve_compile
from .config import DistributedConfig
from .distributed import (DistInfo, barrier, global_rank, init_distributed, is_distributed, main_first,
                          megatron_can_run, shutdown_distributed, world_size)
from .engine import IGNORE_INDEX, Engine, LossFn, Microbatch, StepResult, scored_tokens
from .factory import build_engine
from .parallelize import check_settings
from .native import NativeEngine, build_native_engine
from .precision import check_combination
from .recompute import check_recompute_combination

__all__ = [
    "ActivationCheckpointConfig", "CompileConfig", "apply_activation_checkpointing", "apply_compile", "resolve_compile",
    "IGNORE_INDEX", "DistInfo", "DistributedConfig", "Engine", "LossFn", "Microbatch", "NativeEngine",
    "StepResult", "barrier", "build_engine", "build_native_engine", "check_combination", "check_settings", "check_recompute_combination",
    "global_rank",
    "init_distributed",
    "is_distributed", "main_first", "megatron_can_run", "scored_tokens", "shutdown_distributed", "world_size",
]

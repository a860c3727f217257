"""ct_parallel: engines (native single/DDP/FSDP2, megatron-core), process groups, weight bridge."""

from .engine import IGNORE_INDEX, Engine, LossFn, Microbatch, StepResult, scored_tokens
from .native import NativeEngine, build_native_engine

__all__ = [
    "IGNORE_INDEX", "Engine", "LossFn", "Microbatch", "NativeEngine", "StepResult",
    "build_native_engine", "scored_tokens",
]

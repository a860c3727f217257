"""ct_precision: the one precision setting (fp32, bf16, fp8, or auto: bf16 on CUDA, fp32 on CPU)
that every engine interprets, and the activation checkpointing and per-block compile that the
native engines apply before wrapping."""

from .checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing
from .compile import CompileConfig, apply_compile, resolve_compile
from .fp8 import convert_to_fp8, fp8_layer_names
from .policy import AUTO, DTYPES, FP8_RECIPES, NAMES, PRESETS, PrecisionConfig, apply_tf32

__all__ = ["AUTO", "DTYPES", "FP8_RECIPES", "NAMES", "PRESETS", "ActivationCheckpointConfig", "CompileConfig",
           "PrecisionConfig", "apply_activation_checkpointing", "apply_compile", "apply_tf32", "convert_to_fp8",
           "fp8_layer_names", "resolve_compile"]

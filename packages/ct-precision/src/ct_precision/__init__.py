"""ct_precision: the one precision setting (fp32, bf16, fp8) that every engine interprets, and the
activation checkpointing and per-block compile that the native engines apply before wrapping."""

from .checkpointing import ActivationCheckpointConfig, apply_activation_checkpointing
from .compile import CompileConfig, apply_compile
from .fp8 import convert_to_fp8, fp8_layer_names
from .policy import DTYPES, FP8_RECIPES, NAMES, PrecisionConfig

__all__ = ["DTYPES", "FP8_RECIPES", "NAMES", "ActivationCheckpointConfig", "CompileConfig", "PrecisionConfig",
           "apply_activation_checkpointing", "apply_compile", "convert_to_fp8", "fp8_layer_names"]

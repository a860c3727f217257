"""ct_precision: the one precision setting (fp32, bf16, fp8, or auto: bf16 on CUDA, fp32 on CPU)
that every engine interprets, and FP8 conversion. (Activation checkpointing and per-block compile
are applied by ct-parallel's parallelize step: ct_parallel.activation_checkpoint, ct_parallel.compile.)"""

from .fp8 import convert_to_fp8, fp8_layer_names
from .policy import AUTO, DTYPES, FP8_RECIPES, NAMES, PRESETS, PrecisionConfig, apply_tf32

__all__ = ["AUTO", "DTYPES", "FP8_RECIPES", "NAMES", "PRESETS", "PrecisionConfig", "apply_tf32", "convert_to_fp8",
           "fp8_layer_names"]

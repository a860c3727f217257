"""ct_precision: the one precision setting (fp32, bf16, fp8) that every engine interprets."""

from .fp8 import convert_to_fp8, fp8_layer_names
from .policy import DTYPES, FP8_RECIPES, NAMES, PrecisionConfig

__all__ = ["DTYPES", "FP8_RECIPES", "NAMES", "PrecisionConfig", "convert_to_fp8", "fp8_layer_names"]

"""ct_precision: precision policies (fp32, bf16 autocast; FP8 comes with its own issue)."""

from .policy import DTYPES, PrecisionConfig

__all__ = ["DTYPES", "PrecisionConfig"]

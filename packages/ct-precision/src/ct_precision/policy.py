"""Precision policies, applied from outside the model (the model code never casts)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PrecisionConfig:
    """``dtype``: the autocast dtype of forward passes. Parameters, gradients and optimizer state
    stay fp32 (mixed precision as in Megatron's bf16 path without fp32 master copies)."""

    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"precision.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype]

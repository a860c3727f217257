"""The one precision setting of a run, applied from outside the model (the model code never casts).

``precision=fp32|bf16|fp8`` (configs/precision/) names a preset; its fields say what each engine does:

- ``param_dtype``: the dtype parameters compute in (FSDP2 casts the gathered shards to it; the
  native single/DDP engines and megatron keep fp32 master weights and autocast/cast to it).
- ``reduce_dtype``: the dtype gradients are reduced in across data-parallel ranks (fp32: bf16
  sums over many ranks lose bits).
- ``compute_dtype``: the autocast dtype of the forward pass (None: none).
- ``fp8_recipe``: tensorwise | rowwise | mxfp8 (mxfp8 needs Blackwell-class hardware).
- high-precision layer rules (fp8 only): the output layer and embeddings always stay high precision
  (they are not nn.Linear in the block stack, and FP8 logits hurt the loss); linear layers whose
  dimensions are not multiples of 16 stay high precision (FP8 GEMMs need 16-aligned shapes);
  and, by the size rule, linear layers with in_features * out_features < ``fp8_min_matmul_elements``
  stay high precision: for small matmuls the per-tensor amax + cast overhead outweighs the FP8
  GEMM speed-up (measured by nanochat: FP8 slower than bf16 at hidden 768; torchao's own rowwise
  filter skips N <= 2048 or K <= 1024). The fp8 preset's 2048*2048 keeps the 950M model's square
  1536x1536 attention projections in bf16 and converts its 1536x6144 MLP matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ct_model.config import from_known_fields

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
NAMES = ("fp32", "bf16", "fp8")
FP8_RECIPES = ("tensorwise", "rowwise", "mxfp8")


@dataclass(frozen=True)
class PrecisionConfig:
    dtype: str = "fp32"
    param_dtype: str = "float32"
    reduce_dtype: str = "float32"
    # autocast dtype of forward passes; null: no autocast.
    compute_dtype: str | None = None
    fp8_recipe: str = "tensorwise"
    # Size rule (fp8 only): nn.Linear with in*out below this stays in high precision (0: off).
    fp8_min_matmul_elements: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in NAMES:
            raise ValueError(f"precision.dtype must be one of {NAMES}, got {self.dtype!r}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"precision.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.compute_dtype is not None and self.compute_dtype not in DTYPES:
            raise ValueError(f"precision.compute_dtype must be null or one of {sorted(DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"precision.fp8_recipe must be one of {FP8_RECIPES}, got {self.fp8_recipe!r}")
        size = self.fp8_min_matmul_elements
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"precision.fp8_min_matmul_elements must be an integer >= 0, got {size!r}")
        if self.dtype == "fp32" and (self.param_dtype, self.compute_dtype) != ("float32", None):
            raise ValueError("precision.dtype=fp32 needs param_dtype=float32 and compute_dtype=null")

    @property
    def fp8(self) -> bool:
        return self.dtype == "fp8"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.compute_dtype] if self.compute_dtype else None

    @property
    def torch_param_dtype(self) -> torch.dtype:
        return DTYPES[self.param_dtype]

    @property
    def torch_reduce_dtype(self) -> torch.dtype:
        return DTYPES[self.reduce_dtype]

    def keeps_high_precision(self, module: torch.nn.Module) -> bool:
        """The layer rules: True for a linear layer that must not be converted to FP8."""
        if not isinstance(module, torch.nn.Linear):
            return True  # embeddings, norms: never FP8
        n_in, n_out = module.in_features, module.out_features
        if n_in % 16 or n_out % 16:
            return True
        return n_in * n_out < self.fp8_min_matmul_elements

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PrecisionConfig":
        return from_known_fields(cls, values, "precision config")

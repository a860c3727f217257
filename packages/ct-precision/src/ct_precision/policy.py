"""The one precision setting of a run, applied from outside the model (the model code never casts).

``precision=fp32|bf16|fp8`` (configs/precision/) names a preset; its fields say what each engine does.
Without one, ``precision.dtype=auto`` (the run's default) becomes ``bf16`` on CUDA and ``fp32`` on
CPU, decided once at setup by ``resolve`` (a CPU has no bf16 matmul units, and fp32 keeps the
embedded CPU run exact); an explicit preset is always kept as chosen.

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
- ``tf32``: whether CUDA runs its remaining fp32 matmuls (the loss, the MoE router, fp32 runs) on
  TF32 tensor cores. Null: on for bf16 and fp8 (and auto on CUDA), off for an explicit fp32, which
  then means IEEE fp32 as asked. Applied by ``apply_tf32`` at setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ct_model.config import from_known_fields
from ct_model.dtypes import dtypes

import torch

DTYPES = dtypes("float32", "bfloat16")
NAMES = ("fp32", "bf16", "fp8")  # the presets (configs/precision/*.yaml); "auto" resolves to one of them
AUTO = "auto"
FP8_RECIPES = ("tensorwise", "rowwise", "mxfp8")
# The presets' fields, as configs/precision/*.yaml state them (tests/test_policy.py holds the two
# equal): what ``resolve`` picks for precision.dtype=auto.
PRESETS = {
    "fp32": dict(dtype="fp32", param_dtype="float32", reduce_dtype="float32", compute_dtype=None,
                 fp8_recipe="tensorwise", fp8_min_matmul_elements=0),
    "bf16": dict(dtype="bf16", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16",
                 fp8_recipe="tensorwise", fp8_min_matmul_elements=0),
    "fp8": dict(dtype="fp8", param_dtype="bfloat16", reduce_dtype="float32", compute_dtype="bfloat16",
                fp8_recipe="tensorwise", fp8_min_matmul_elements=2048 * 2048),
}


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
    # TF32 for CUDA's fp32 matmuls; null: on unless the run chose fp32 explicitly.
    tf32: bool | None = None

    def __post_init__(self) -> None:
        if self.dtype not in (*NAMES, AUTO):
            raise ValueError(f"precision.dtype must be one of {(*NAMES, AUTO)}, got {self.dtype!r}")
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
        if self.tf32 is not None and not isinstance(self.tf32, bool):
            raise ValueError(f"precision.tf32 must be true, false or null, got {self.tf32!r}")
        if self.dtype == "fp32" and (self.param_dtype, self.compute_dtype) != ("float32", None):
            raise ValueError("precision.dtype=fp32 needs param_dtype=float32 and compute_dtype=null")
        if self.dtype == AUTO:
            # auto picks a whole preset per device: a field set beside it would be silently replaced.
            fixed = {k: v for k, v in PRESETS["fp32"].items() if k != "dtype"}
            changed = sorted(k for k, v in fixed.items() if getattr(self, k) != v)
            if changed:
                raise ValueError(f"precision.dtype=auto chooses bf16 on CUDA and fp32 on CPU, whole presets; "
                                 f"precision.{changed[0]} cannot be set beside it: pick precision=fp32|bf16|fp8")

    @property
    def fp8(self) -> bool:
        return self.dtype == "fp8"

    @property
    def is_auto(self) -> bool:
        return self.dtype == AUTO

    @property
    def wants_tf32(self) -> bool:
        """TF32 for CUDA fp32 matmuls: as set, else on for everything but an explicit fp32."""
        return self.tf32 if self.tf32 is not None else self.dtype != "fp32"

    @classmethod
    def preset(cls, name: str, **overrides) -> "PrecisionConfig":
        if name not in PRESETS:
            raise ValueError(f"precision.dtype must be one of {NAMES}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def resolve(self, device: torch.device) -> tuple["PrecisionConfig", str]:
        """The precision a run on ``device`` uses, and why (one line for the run log). Only
        dtype=auto changes: bf16 on CUDA (tensor cores; fp32 master weights and reduction),
        fp32 elsewhere (no bf16 units on a CPU, and fp32 keeps CPU runs exact)."""
        if not self.is_auto:
            return self, f"precision={self.dtype} (chosen in the config)"
        if device.type == "cuda":
            return (self.preset("bf16", tf32=self.tf32),
                    "precision=bf16 (precision.dtype=auto on cuda: bf16 compute, fp32 master weights and "
                    "gradient reduction; precision=fp32 keeps fp32)")
        return (self.preset("fp32", tf32=self.tf32),
                f"precision=fp32 (precision.dtype=auto on {device.type}: no bf16 matmul units there, and fp32 "
                "keeps CPU runs exact)")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return DTYPES[self.compute_dtype] if self.compute_dtype else None

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


def apply_tf32(precision: PrecisionConfig, device: torch.device) -> str | None:
    """Set CUDA's fp32 matmul mode for this process from ``precision`` (resolved); returns the log
    line, or None off CUDA (TF32 is a CUDA tensor-core mode; the call below would also switch
    oneDNN's CPU matmuls, which CPU runs must not see).

    ``torch.set_float32_matmul_precision`` rather than the per-backend
    ``torch.backends.cuda.matmul.fp32_precision``: in torch 2.15 setting only the new flag makes
    every reader of the legacy one (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.get_float32_matmul_precision()``) raise "mix of the legacy and new APIs", and
    inductor's own bmm template still reads ``allow_tf32``; this call sets both views
    consistently. It is always set on CUDA ("highest" included): several phases of one process
    (ct-recipe) must not inherit the previous phase's mode. cuDNN convolutions already default
    to TF32 (``torch.backends.cudnn.conv.fp32_precision``); ct-model has none."""
    if device.type != "cuda":
        return None
    on = precision.wants_tf32
    torch.set_float32_matmul_precision("high" if on else "highest")
    why = "precision.tf32" if precision.tf32 is not None else f"precision={precision.dtype}"
    return (f"TF32 {'on' if on else 'off'} for fp32 matmuls on cuda ({why}; "
            f"torch.backends.cuda.matmul.fp32_precision={torch.backends.cuda.matmul.fp32_precision})")

"""Floating-point dtypes by name: the one map from config names to torch dtypes that every package
reads (here, in the lowest package, so all can). Both spellings are in it: torch's ("bfloat16")
and the short one ("bf16"). Each caller takes its allowed names with ``dtypes(...)``, so what a
config field accepts stays written where the field is checked."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def dtypes(*names: str) -> dict[str, torch.dtype]:
    """The map restricted to ``names`` (a caller's allowed set, in its order and spelling)."""
    return {name: DTYPES[name] for name in names}

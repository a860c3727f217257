"""Maintained fused linear cross-entropy kernels (CUDA only), used when installed.

cut-cross-entropy (Apple's CCE) or Liger's fused linear cross-entropy compute CE from hidden states
and the output weight without materialising the logits, in Triton. Neither is a dependency: each
is looked up at call time, and only for CUDA tensors (both are Triton kernels). Everything else
takes ct_model.chunked_ce's pure-torch chunked path.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch

from .batch import IGNORE_INDEX

KERNELS = ("cut_cross_entropy", "liger_kernel")
# "none": the torch chunked path always ("off", its older spelling, is still accepted).
FUSED_CHOICES = ("auto", "none", "off") + KERNELS


@lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pick_kernel(device: torch.device, fused: str = "auto") -> str | None:
    """The kernel to use for tensors on ``device``: None means the pure-torch path.

    ``fused``: "auto" (the first installed of KERNELS, on CUDA), "none", or one kernel's name
    (which must then be installed and the device CUDA)."""
    if fused not in FUSED_CHOICES:
        raise ValueError(f"loss.fused_kernel must be one of {FUSED_CHOICES}, got {fused!r}")
    if fused in ("none", "off"):
        return None
    if fused != "auto":
        if device.type != "cuda" or not _installed(fused):
            raise ValueError(f"loss.fused_kernel={fused} needs CUDA tensors and the {fused} package installed")
        return fused
    if device.type != "cuda":
        return None
    return next((k for k in KERNELS if _installed(k)), None)


def fused_linear_cross_entropy(kernel: str, hidden: torch.Tensor, weight: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
    """Sum of token CE by ``kernel`` on flattened ``hidden`` [N, H], ``weight`` [V, H], ``labels`` [N]."""
    if kernel == "cut_cross_entropy":
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum").float()
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    out = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return (out[0] if isinstance(out, tuple) else out).float()  # some versions return (loss, z_loss)

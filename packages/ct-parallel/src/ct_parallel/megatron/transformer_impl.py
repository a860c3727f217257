"""Which layer implementation the megatron engine builds (``distributed.transformer_impl``).

- ``transformer_engine``: megatron's Transformer Engine spec (fused kernels, THD packed attention
  with cu_seqlens, FP8). Needs CUDA and an importable ``transformer_engine``.
- ``local``: megatron's local spec (plain torch modules). Its attention takes no THD, so packed
  documents need a dense [B, 1, T, T] mask, and it keeps the T x T softmax output in fp32 and the
  probabilities in bf16 for backward: 6 bytes per (row, head, T, T) element and layer, O(T^2).
  Fine on a CPU (where megatron runs only under the test shim) and for short sequences; at
  mobilellm_950m, micro batch 8 x 2048, that is 4.8 GB per layer, 106 GB over its 22 layers.
- ``auto``: Transformer Engine on CUDA, local without CUDA. On CUDA without a usable Transformer
  Engine it refuses (naming the key and the install command) instead of falling back to local
  silently: the fallback would run out of memory, or run slowly, far from the cause.
"""

from __future__ import annotations

import functools
import logging

import torch
from ct_model.errors import UserError

from ..config import DistributedConfig

log = logging.getLogger(__name__)

INSTALL = "`uv sync --extra te` (docs/ct-parallel.md, 'On a GPU')"
# Saved for backward per attention score (row, head, query, key) by the local spec under bf16:
# the softmax's fp32 output and the bf16 probabilities (measured in the engine by
# packages/ct-parallel/tests/dist_megatron_bf16_checks.py, asserted by test_precision_matrix.py).
LOCAL_ATTENTION_BYTES_PER_SCORE = 6


class TransformerEngineUnavailable(UserError):
    """The configured transformer_impl needs Transformer Engine (and CUDA), which are missing."""


def transformer_engine_import_error() -> str | None:
    """None when Transformer Engine's torch API imports; else why it does not (for the message:
    a build against another torch fails here too, not only a missing package)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable"
        return f"{type(err).__name__}: {err}"
    return None


def have_transformer_engine() -> bool:
    return torch.cuda.is_available() and transformer_engine_import_error() is None


def use_transformer_engine(dist_config: DistributedConfig) -> bool:
    """True: build the TE spec; False: the local spec. Raises TransformerEngineUnavailable where
    the choice would be the local spec without the user having asked for it on a GPU."""
    impl = dist_config.transformer_impl
    on_cuda = torch.cuda.is_available()
    if impl == "local":
        if on_cuda:
            _warn_local_on_cuda()
        return False
    if impl == "auto" and not on_cuda:
        return False  # CPU: megatron runs only under the test shim, on the local spec
    why = "no CUDA device" if not on_cuda else transformer_engine_import_error()
    if why is None:
        return True
    raise TransformerEngineUnavailable(_refusal(impl, why))


def _refusal(impl: str, why: str) -> str:
    if impl == "transformer_engine":
        return (f"distributed.transformer_impl=transformer_engine needs Transformer Engine on CUDA ({why}). "
                f"Install it with {INSTALL}, or set distributed.transformer_impl=local")
    return (f"distributed.transformer_impl=auto on a CUDA machine without a usable Transformer Engine ({why}). "
            f"Install it with {INSTALL}. Refusing to fall back silently to megatron's local spec: its "
            f"attention keeps a dense [B, 1, T, T] document mask and {LOCAL_ATTENTION_BYTES_PER_SCORE} bytes per "
            "score for backward (O(T^2): 106 GB for mobilellm_950m at 8 x 2048), no THD packing, no FP8. To run "
            "it anyway (short sequences, debugging), set distributed.transformer_impl=local")


@functools.cache
def _warn_local_on_cuda() -> None:
    log.warning("distributed.transformer_impl=local on CUDA: megatron's local spec, attention with a dense "
                "[B, 1, T, T] mask and %d bytes per score saved for backward (O(T^2) in the sequence length); "
                "%s gives the Transformer Engine spec (THD packed attention, fused kernels, FP8)",
                LOCAL_ATTENTION_BYTES_PER_SCORE, INSTALL)

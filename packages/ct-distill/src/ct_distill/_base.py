"""Shared pieces of the KD losses: option/shape checks, the TopK teacher type."""

from __future__ import annotations

from typing import NamedTuple, Union

import torch

from ct_model.batch import IGNORE_INDEX  # noqa: F401 (re-exported)
from ct_model.errors import UserError

KINDS = ("forward_kl", "reverse_kl", "jsd")


class TopK(NamedTuple):
    """A teacher truncated to its top-k tokens per position.

    ids: [..., k] integer token ids (sorted by decreasing teacher probability).
    logprobs: [..., k] teacher log-softmax at temperature 1 over the full vocabulary, at ``ids``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


Teacher = Union[torch.Tensor, TopK, tuple]


class VocabMismatchError(UserError):
    """Teacher and student disagree on the vocabulary size."""


def check_options(kind: str, temperature: float, beta: float, ce_weight: float,
                  top_k: int | None) -> None:
    """Validate the loss options; errors name the offending argument."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd' (0 and 1 make JSD vanish), got {beta!r}")
    if not ce_weight >= 0:
        raise ValueError(f"ce_weight must be >= 0, got {ce_weight!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_topk(teacher: Teacher) -> TopK | None:
    """The teacher as TopK when it is given in cached form, else None (full logits)."""
    if isinstance(teacher, torch.Tensor):
        return None
    if isinstance(teacher, (tuple, list)) and len(teacher) == 2:
        return TopK(*teacher)
    raise TypeError(f"teacher must be logits (a Tensor) or TopK(ids, logprobs), got {type(teacher).__name__}")


def check_shapes(student_shape: torch.Size, teacher: Teacher, labels: torch.Tensor | None,
                 top_k: int | None) -> None:
    """Clear errors for vocabulary, position and top-k shape mismatches."""
    vocab = student_shape[-1]
    lead = tuple(student_shape[:-1])
    cached = as_topk(teacher)
    if cached is None:
        if teacher.shape[-1] != vocab:
            raise VocabMismatchError(
                f"teacher vocabulary size {teacher.shape[-1]} != student vocabulary size {vocab}"
            )
        if tuple(teacher.shape[:-1]) != lead:
            raise ValueError(f"teacher logits positions {tuple(teacher.shape[:-1])} != student {lead}")
    else:
        if cached.ids.shape != cached.logprobs.shape:
            raise ValueError(f"top-k ids {tuple(cached.ids.shape)} and logprobs "
                             f"{tuple(cached.logprobs.shape)} differ in shape")
        if tuple(cached.ids.shape[:-1]) != lead:
            raise ValueError(f"top-k teacher positions {tuple(cached.ids.shape[:-1])} != student {lead}")
        if cached.ids.dtype.is_floating_point:
            raise TypeError(f"top-k ids must be integers, got {cached.ids.dtype}")
        k = cached.ids.shape[-1]
        if k > vocab:
            raise VocabMismatchError(f"cached teacher has k={k} > student vocabulary size {vocab}")
        if top_k is not None and top_k > k:
            raise ValueError(f"top_k={top_k} exceeds the cached teacher's k={k}")
    if top_k is not None and top_k > vocab:
        raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}")
    if labels is not None and tuple(labels.shape) != lead:
        raise ValueError(f"labels shape {tuple(labels.shape)} != logits positions {lead}")




def plogp_ratio(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """sum p * (log p - log r) over the last dim, with 0 * log 0 = 0 (and no NaN gradients)."""
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum(-1)

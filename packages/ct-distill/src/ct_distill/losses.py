"""Knowledge-distillation losses on logits: forward KL, reverse KL, generalised JSD(beta).

Conventions (see docs/ct-distill.md for the formulas):

- p is the teacher, q the student, both softened by the temperature T: p = softmax(t / T),
  q = softmax(s / T). Every divergence is multiplied by T**2 (Hinton et al.), so gradient
  magnitudes stay comparable across temperatures.
- ``forward_kl`` = KL(p || q); ``reverse_kl`` = KL(q || p);
  ``jsd`` = beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q.
- Positions are scored where ``labels != ignore_index`` (every position when labels is None).
  Labels are already aligned with the logits: nothing is shifted here.
- The optional CE term (temperature 1, against labels) is ADDED with weight ``ce_weight``.
- Top-k: the teacher keeps its k largest logits and is renormalised over them (at temperature T).
  The student keeps its full-vocabulary softmax; its mass outside the teacher's top-k (the "rest"
  bin) is handled per kind, explicitly:
    * forward_kl: KL(p_k || q) with p_k zero outside the top-k. Only the top-k terms are non-zero,
      but log q is normalised over the whole vocabulary, so student mass outside the top-k is
      penalised (it lowers every log q_i).
    * jsd: computed over the top-k entries plus one "rest" bin holding the student's outside mass
      q_rest (teacher mass 0 there); that bin contributes (1 - beta) * q_rest * log(1 / (1 - beta)).
      This equals the full-vocabulary JSD against the zero-extended teacher.
    * reverse_kl: KL(q || p_k) is infinite as soon as the student puts mass outside the top-k, so
      the student is renormalised over the teacher's top-k too; its outside mass is NOT penalised
      by this term (add ``ce_weight`` or use forward_kl / jsd if that matters).
  With k = vocabulary size every variant equals the untruncated loss.
- The teacher may be full logits [..., V] or a cached top-k ``TopK(ids [..., k], logprobs [..., k])``
  where logprobs are the teacher's log-softmax at temperature 1 over the FULL vocabulary, gathered
  at ids. The temperature is applied by renormalising over the k entries: p_T ~ exp(logprob / T),
  which is exactly what top-k truncation of full logits gives.
- The teacher is a constant target: it is detached.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100


class TopK(NamedTuple):
    """A teacher truncated to its top-k tokens per position.

    ids: [..., k] integer token ids (sorted by decreasing teacher probability).
    logprobs: [..., k] teacher log-softmax at temperature 1 over the full vocabulary, at ``ids``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor


Teacher = Union[torch.Tensor, TopK, tuple]


class VocabMismatchError(ValueError):
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


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
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


# ----------------------------------------------------------------------------- per-token divergences


def _plogp_ratio(p: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """sum p * (log p - log r) over the last dim, with 0 * log 0 = 0 (and no NaN gradients)."""
    return torch.where(p > 0, p * (log_p - log_r), torch.zeros_like(p)).sum(-1)


def _dense(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Divergence per row for full-vocabulary logits already divided by the temperature."""
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return _plogp_ratio(p, log_p, log_q)
    if kind == "reverse_kl":
        return _plogp_ratio(q, log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _plogp_ratio(p, log_p, log_m) + (1 - beta) * _plogp_ratio(q, log_q, log_m)


def _sparse(s: torch.Tensor, ids: torch.Tensor, t_k: torch.Tensor, kind: str,
            beta: float) -> torch.Tensor:
    """Divergence per row against a teacher truncated to ``ids`` (values ``t_k``, already / T)."""
    log_p = F.log_softmax(t_k, dim=-1)  # teacher renormalised over its top-k
    p = log_p.exp()
    log_q_full = F.log_softmax(s, dim=-1)
    log_q = log_q_full.gather(-1, ids)  # student, normalised over the full vocabulary
    if kind == "forward_kl":
        return _plogp_ratio(p, log_p, log_q)
    if kind == "reverse_kl":
        log_q_k = F.log_softmax(log_q, dim=-1)  # student renormalised over the teacher's top-k
        return _plogp_ratio(log_q_k.exp(), log_q_k, log_p)
    # jsd over top-k + one rest bin (teacher 0, student q_rest)
    q = log_q.exp()
    outside = torch.ones_like(log_q_full, dtype=torch.bool).scatter_(-1, ids, False)
    q_rest = torch.where(outside, log_q_full.exp(), torch.zeros_like(log_q_full)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_pm = _plogp_ratio(p, log_p, log_m)
    kl_qm = _plogp_ratio(q, log_q, log_m) - q_rest * math.log1p(-beta)
    return beta * kl_pm + (1 - beta) * kl_qm


def token_divergence(student_logits: torch.Tensor, teacher: Teacher, kind: str = "forward_kl",
                     temperature: float = 1.0, top_k: int | None = None,
                     beta: float = 0.5) -> torch.Tensor:
    """Divergence per position [...] (NOT scaled by T**2), computed in float32 (float64 stays)."""
    dtype = _compute_dtype(student_logits)
    s = student_logits.to(dtype) / temperature
    cached = as_topk(teacher)
    if cached is not None:
        ids, values = cached.ids.detach(), cached.logprobs.detach().to(dtype)
        if top_k is not None and top_k < ids.shape[-1]:
            values, order = torch.topk(values, top_k, dim=-1)
            ids = ids.gather(-1, order)
        return _sparse(s, ids.long(), values / temperature, kind, beta)
    t = teacher.detach().to(dtype)
    if top_k is None:
        return _dense(s, t / temperature, kind, beta)
    # top-k on the unscaled teacher logits: the same selection the cache writer makes
    values, ids = torch.topk(t, top_k, dim=-1)
    return _sparse(s, ids, values / temperature, kind, beta)


# ----------------------------------------------------------------------------- public losses


def kd_loss_sum(student_logits: torch.Tensor, teacher_logits: Teacher,
                labels: torch.Tensor | None = None, kind: str = "forward_kl",
                temperature: float = 1.0, top_k: int | None = None, beta: float = 0.5,
                ce_weight: float = 0.0,
                ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over scored positions of T**2 * D + ce_weight * CE, number of scored positions).

    ``kd_loss`` is the first divided by the second. The sum form is what a trainer that normalises
    over all tokens of a global batch (across microbatches and ranks) needs.
    """
    check_options(kind, temperature, beta, ce_weight, top_k)
    check_shapes(student_logits.shape, teacher_logits, labels, top_k)
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    cached = as_topk(teacher_logits)
    if cached is None:
        teacher = teacher_logits.reshape(-1, vocab)
    else:
        k = cached.ids.shape[-1]
        teacher = TopK(cached.ids.reshape(-1, k), cached.logprobs.reshape(-1, k))
    per_token = token_divergence(s, teacher, kind, temperature, top_k, beta) * temperature**2
    if labels is None:
        count = torch.tensor(per_token.numel(), device=per_token.device)
        total = per_token.sum()
    else:
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        count = valid.sum()
        total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        if ce_weight > 0:
            ce = F.cross_entropy(s.to(per_token.dtype), flat_labels, ignore_index=ignore_index,
                                 reduction="sum")
            total = total + ce_weight * ce
    return total, count


def kd_loss(student_logits: torch.Tensor, teacher_logits: Teacher,
            labels: torch.Tensor | None = None, kind: str = "forward_kl",
            temperature: float = 1.0, top_k: int | None = None, beta: float = 0.5,
            ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean over scored positions of T**2 * D(teacher, student) (+ ce_weight * CE).

    Scored positions: ``labels != ignore_index``, or all positions when labels is None. Zero
    (not NaN) when no position is scored.
    """
    total, count = kd_loss_sum(student_logits, teacher_logits, labels, kind, temperature, top_k,
                               beta, ce_weight, ignore_index)
    return total / count.clamp(min=1).to(total.dtype)

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
import torch
import torch.nn.functional as F

from ._base import (IGNORE_INDEX, KINDS, Teacher, TopK, VocabMismatchError, as_topk,  # noqa: F401
                    check_options, check_shapes, compute_dtype, plogp_ratio)
from .fused import fused_kd_loss_sum


# ----------------------------------------------------------------------------- per-token divergences


def _dense(s: torch.Tensor, t: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Divergence per row for full-vocabulary logits already divided by the temperature."""
    log_q = F.log_softmax(s, dim=-1)
    log_p = F.log_softmax(t, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        return plogp_ratio(p, log_p, log_q)
    if kind == "reverse_kl":
        return plogp_ratio(q, log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * plogp_ratio(p, log_p, log_m) + (1 - beta) * plogp_ratio(q, log_q, log_m)


def _sparse(s: torch.Tensor, ids: torch.Tensor, t_k: torch.Tensor, kind: str,
            beta: float) -> torch.Tensor:
    """Divergence per row against a teacher truncated to ``ids`` (values ``t_k``, already / T)."""
    log_p = F.log_softmax(t_k, dim=-1)  # teacher renormalised over its top-k
    p = log_p.exp()
    log_q_full = F.log_softmax(s, dim=-1)
    log_q = log_q_full.gather(-1, ids)  # student, normalised over the full vocabulary
    if kind == "forward_kl":
        return plogp_ratio(p, log_p, log_q)
    if kind == "reverse_kl":
        log_q_k = F.log_softmax(log_q, dim=-1)  # student renormalised over the teacher's top-k
        return plogp_ratio(log_q_k.exp(), log_q_k, log_p)
    # jsd over top-k + one rest bin (teacher 0, student q_rest)
    q = log_q.exp()
    outside = torch.ones_like(log_q_full, dtype=torch.bool).scatter_(-1, ids, False)
    q_rest = torch.where(outside, log_q_full.exp(), torch.zeros_like(log_q_full)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_pm = plogp_ratio(p, log_p, log_m)
    kl_qm = plogp_ratio(q, log_q, log_m) - q_rest * math.log1p(-beta)
    return beta * kl_pm + (1 - beta) * kl_qm


def token_divergence(student_logits: torch.Tensor, teacher: Teacher, kind: str = "forward_kl",
                     temperature: float = 1.0, top_k: int | None = None,
                     beta: float = 0.5) -> torch.Tensor:
    """Divergence per position [...] (NOT scaled by T**2), computed in float32 (float64 stays)."""
    dtype = compute_dtype(student_logits)
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
                ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX, *,
                fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over scored positions of T**2 * D + ce_weight * CE, number of scored positions).

    ``kd_loss`` is the first divided by the second. The sum form is what a trainer that normalises
    over all tokens of a global batch (across microbatches and ranks) needs.

    ``fused=True`` computes the gradient in closed form during the forward (``fused.py``): one
    extra logits-sized fp32 buffer instead of the several autograd keeps, first-order gradients
    only. ``fused=False`` is plain autograd over ``token_divergence`` (double backward works).
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
    flat_labels = valid = None
    count = torch.tensor(s.shape[0], device=s.device)
    if labels is not None:
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        count = valid.sum()
    if fused:
        total = fused_kd_loss_sum(s, teacher, flat_labels, valid, kind, temperature, top_k, beta,
                                  ce_weight)
        return total, count
    per_token = token_divergence(s, teacher, kind, temperature, top_k, beta) * temperature**2
    if valid is None:
        return per_token.sum(), count
    total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    if ce_weight > 0:
        ce = F.cross_entropy(s.to(per_token.dtype), flat_labels, ignore_index=ignore_index,
                             reduction="sum")
        total = total + ce_weight * ce
    return total, count


def kd_loss(student_logits: torch.Tensor, teacher_logits: Teacher,
            labels: torch.Tensor | None = None, kind: str = "forward_kl",
            temperature: float = 1.0, top_k: int | None = None, beta: float = 0.5,
            ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX, *,
            fused: bool = True) -> torch.Tensor:
    """Mean over scored positions of T**2 * D(teacher, student) (+ ce_weight * CE).

    Scored positions: ``labels != ignore_index``, or all positions when labels is None. Zero
    (not NaN) when no position is scored.
    """
    total, count = kd_loss_sum(student_logits, teacher_logits, labels, kind, temperature, top_k,
                               beta, ce_weight, ignore_index, fused=fused)
    return total / count.clamp(min=1).to(total.dtype)

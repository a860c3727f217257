"""KD losses on student logits split over the vocabulary (megatron tensor parallelism).

Each rank holds the student's logits for its vocabulary slice ``[shard.start, shard.end)``; the
teacher's targets (full logits or top-k) are whole on every rank. The loss is the same sum as
``kd_loss_sum`` on the full logits (same kinds, temperature, top-k handling and CE term, see
losses.py), computed without gathering the student's [tokens, vocab]:

- the student's log-softmax: slice logits minus a log-sum-exp whose max and sum of exponentials
  are reduced over the ranks (``shard.max``, ``shard.sum``);
- a dense divergence (full teacher): each rank sums its slice's terms, then ``shard.sum``;
- a top-k divergence: the student's log-probabilities at the teacher's ids are picked by the rank
  that owns each id and summed over ranks; the rest is per-row and identical on every rank.

``shard`` is a ``ct_model.batch.VocabShard`` (``ct_parallel.vocab.vocab_shard`` builds one for a
process group). Every rank returns the same total; gradients reach each rank's own slice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._base import IGNORE_INDEX, Teacher, as_topk, compute_dtype, plogp_ratio


def _log_softmax(local: torch.Tensor, shard) -> torch.Tensor:
    """log softmax over the whole vocabulary, for this rank's slice [N, V_local]."""
    top = shard.max(local.max(-1, keepdim=True).values)
    total = shard.sum(torch.exp(local - top).sum(-1, keepdim=True))
    return local - shard.use_locally(top + total.log())


def _pick(local_values: torch.Tensor, ids: torch.Tensor, shard) -> tuple[torch.Tensor, torch.Tensor]:
    """(values at the global ``ids`` [N, k] summed over ranks, mask of the ids this rank owns)."""
    owned = (ids >= shard.start) & (ids < shard.end)
    local_ids = (ids - shard.start).clamp(0, local_values.shape[-1] - 1)
    picked = torch.where(owned, local_values.gather(-1, local_ids), torch.zeros((), dtype=local_values.dtype,
                                                                                 device=local_values.device))
    return shard.sum(picked), owned


def _dense(s: torch.Tensor, t: torch.Tensor, shard, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence against the full teacher logits ``t`` [N, V] (both already / T)."""
    log_q = _log_softmax(s, shard)
    log_p = F.log_softmax(t, dim=-1)[:, shard.start:shard.end]
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward_kl":
        part = plogp_ratio(p, log_p, log_q)
    elif kind == "reverse_kl":
        part = plogp_ratio(q, log_q, log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        part = beta * plogp_ratio(p, log_p, log_m) + (1 - beta) * plogp_ratio(q, log_q, log_m)
    return shard.sum(part)


def _sparse(s: torch.Tensor, ids: torch.Tensor, t_k: torch.Tensor, shard, kind: str,
            beta: float) -> torch.Tensor:
    """Per-row divergence against a teacher truncated to ``ids`` (values ``t_k``, already / T)."""
    log_p = F.log_softmax(t_k, dim=-1)
    p = log_p.exp()
    log_q_local = _log_softmax(s, shard)
    log_q, owned = _pick(log_q_local, ids, shard)  # student, normalised over the full vocabulary
    if kind == "forward_kl":
        return plogp_ratio(p, log_p, log_q)
    if kind == "reverse_kl":
        log_q_k = F.log_softmax(log_q, dim=-1)
        return plogp_ratio(log_q_k.exp(), log_q_k, log_p)
    q = log_q.exp()
    # the student's mass outside the teacher's top-k: this slice's mass less its own top-k entries
    inside = torch.where(owned, q, torch.zeros_like(q)).sum(-1)
    q_rest = shard.sum(log_q_local.exp().sum(-1) - inside)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_pm = plogp_ratio(p, log_p, log_m)
    kl_qm = plogp_ratio(q, log_q, log_m) - q_rest * math.log1p(-beta)
    return beta * kl_pm + (1 - beta) * kl_qm


def _divergence(s: torch.Tensor, teacher: Teacher, shard, kind: str, temperature: float,
                top_k: int | None, beta: float) -> torch.Tensor:
    """As ``losses.token_divergence``, on the slice ``s`` [N, V_local] (not scaled by T**2)."""
    s = s / temperature
    cached = as_topk(teacher)
    if cached is not None:
        ids, values = cached.ids.detach(), cached.logprobs.detach().to(s.dtype)
        if top_k is not None and top_k < ids.shape[-1]:
            values, order = torch.topk(values, top_k, dim=-1)
            ids = ids.gather(-1, order)
        return _sparse(s, ids.long(), values / temperature, shard, kind, beta)
    t = teacher.detach().to(s.dtype)
    if top_k is None:
        return _dense(s, t / temperature, shard, kind, beta)
    values, ids = torch.topk(t, top_k, dim=-1)
    return _sparse(s, ids, values / temperature, shard, kind, beta)


def kd_loss_sum_on_shards(local_logits: torch.Tensor, teacher: Teacher, labels: torch.Tensor | None,
                          shard, kind: str = "forward_kl", temperature: float = 1.0,
                          top_k: int | None = None, beta: float = 0.5, ce_weight: float = 0.0,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``kd_loss_sum(full_logits, ...)[0]`` from this rank's slice ``local_logits`` [..., V_local]."""
    dtype = compute_dtype(local_logits)
    s = local_logits.reshape(-1, local_logits.shape[-1]).to(dtype)
    cached = as_topk(teacher)
    if cached is None:
        teacher = teacher.reshape(-1, teacher.shape[-1])
    else:
        k = cached.ids.shape[-1]
        teacher = type(cached)(cached.ids.reshape(-1, k), cached.logprobs.reshape(-1, k))
    per_token = _divergence(s, teacher, shard, kind, temperature, top_k, beta) * temperature**2
    if labels is None:
        return per_token.sum()
    flat = labels.reshape(-1)
    valid = flat != ignore_index
    total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    if ce_weight > 0:
        target, _ = _pick(_log_softmax(s, shard), flat.masked_fill(~valid, 0)[:, None], shard)
        ce = -target.squeeze(-1)
        total = total + ce_weight * torch.where(valid, ce, torch.zeros_like(ce)).sum()
    return total

"""Loss and d loss / d logits in one pass, with closed-form gradients (used per chunk).

The same quantities as ``losses.token_divergence`` (+ CE), but the gradient is written out by hand
and computed with in-place operations, so a chunk needs about two logits-sized buffers instead of
the five or six autograd keeps. Tests check it against autograd through ``kd_loss``.

With z = s / T, q = softmax(z), the per-row loss is T^2 * D + w * CE(s), hence
d loss / d s = T * dD/dz + w * (softmax(s) - onehot(label)), and for a function of q,
dD/dz_j = q_j * (g_j - sum_i q_i g_i) with g = dD/dq:

- forward KL   D = sum p (log p - log q)                dD/dz = q - p
- reverse KL   D = sum q (log q - log p)                dD/dz = q * (log q - log p - D)
- JSD(beta)    D = beta KL(p||m) + (1-beta) KL(q||m)     g = (1 - beta) * log(q / m)
- top-k: p is zero outside the teacher's top-k; reverse KL uses the student renormalised over the
  top-k (so dD/dz is zero outside it); JSD's rest bin has g = -(1 - beta) log(1 - beta).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .losses import TopK, _plogp_ratio


def loss_and_grad(logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor | None,
                  kind: str, temperature: float, top_k: int | None, beta: float,
                  ce_weight: float, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over rows of T^2 * D + ce_weight * CE, d/d logits or None) for logits [n, V].

    ``logits`` is consumed: when it is already in the compute dtype it is overwritten in place.
    """
    T = float(temperature)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    ce = None
    if ce_weight > 0:
        s = logits.to(dtype)
        lse1 = torch.logsumexp(s, -1, keepdim=True)
        ce = (lse1.squeeze(-1) - s.gather(-1, labels[:, None]).squeeze(-1)).sum()
        del s
    # A: z = s / T, turned into log q in place
    a = logits.to(dtype) if logits.dtype != dtype else logits
    del logits
    if T != 1.0:
        a.div_(T)
    lse = torch.logsumexp(a, -1, keepdim=True)
    log_q = a.sub_(lse)
    q = log_q.exp()  # B: becomes the gradient in place

    cached = teacher if isinstance(teacher, TopK) else None
    if cached is None and top_k is not None:
        values, ids = torch.topk(teacher.to(dtype), top_k, dim=-1)
        cached = TopK(ids, values)
    if cached is not None:
        ids, values = cached.ids.long(), cached.logprobs.to(dtype)
        if top_k is not None and top_k < ids.shape[-1]:
            values, order = torch.topk(values, top_k, dim=-1)
            ids = ids.gather(-1, order)
        d, grad = _sparse(log_q, q, ids, values / T, kind, beta, need_grad)
    else:
        d, grad = _dense(log_q, q, teacher.to(dtype) / T, kind, beta, need_grad)
    loss = d.sum() * T * T
    if ce is not None:
        loss = loss + ce_weight * ce
    if not need_grad:
        return loss, None
    grad.mul_(T)
    if ce is not None:
        # softmax(s) rebuilt in place from log q: s = T * (log q + lse)
        soft = log_q.add_(lse).mul_(T).sub_(lse1).exp_()
        grad.add_(soft, alpha=ce_weight)
        grad.scatter_add_(-1, labels[:, None], torch.full_like(grad[:, :1], -ce_weight))
    return loss, grad


def _sparse(log_q, q, ids, t_k, kind, beta, need_grad):
    log_p = F.log_softmax(t_k, dim=-1)
    p = log_p.exp()
    log_q_k = log_q.gather(-1, ids)
    if kind == "forward_kl":
        d = _plogp_ratio(p, log_p, log_q_k)
        return d, (q.scatter_add_(-1, ids, -p) if need_grad else None)
    if kind == "reverse_kl":
        log_qh = F.log_softmax(log_q_k, dim=-1)
        qh = log_qh.exp()
        d = _plogp_ratio(qh, log_qh, log_p)
        if not need_grad:
            return d, None
        g_k = torch.where(qh > 0, qh * (log_qh - log_p - d[:, None]), torch.zeros_like(qh))
        return d, q.zero_().scatter_(-1, ids, g_k)
    q_k = log_q_k.exp()
    log1m = math.log1p(-beta)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q_k + log1m)
    g_k = (1 - beta) * (log_q_k - log_m)
    g_out = -(1 - beta) * log1m  # dD/dq outside the top-k (the rest bin)
    q_rest = (q.sum(-1) - q_k.sum(-1)).clamp(min=0)
    qg = (q_k * g_k).sum(-1) + q_rest * g_out  # = (1 - beta) KL(q || m), rest bin included
    d = beta * _plogp_ratio(p, log_p, log_m) + qg
    if not need_grad:
        return d, None
    grad = q.mul_((g_out - qg)[:, None])
    return d, grad.scatter_(-1, ids, q_k * (g_k - qg[:, None]))


def _dense(log_q, q, t, kind, beta, need_grad):
    log_p = F.log_softmax(t, dim=-1)
    del t
    p = log_p.exp()
    if kind == "forward_kl":
        d = _plogp_ratio(p, log_p, log_q)
        return d, (q.sub_(p) if need_grad else None)
    if kind == "reverse_kl":
        diff = log_q - log_p
        d = torch.where(q > 0, q * diff, torch.zeros_like(q)).sum(-1)
        return d, (q.mul_(diff.sub_(d[:, None])) if need_grad else None)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_pm = _plogp_ratio(p, log_p, log_m)
    del p, log_p
    g = log_m.neg_().add_(log_q).mul_(1 - beta)  # (1 - beta) * log(q / m), in place
    qg = torch.where(q > 0, q * g, torch.zeros_like(q)).sum(-1)
    d = beta * kl_pm + qg
    return d, (q.mul_(g.sub_(qg[:, None])) if need_grad else None)

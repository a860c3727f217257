"""Loss and d loss / d logits in one pass, with closed-form gradients (used per chunk).

The same quantities as ``losses.token_divergence`` (+ CE), but the gradient is written out by hand
and computed in place. Against a top-k teacher (cached, or ``top_k`` truncation) a chunk needs ONE
logits-sized buffer (the logits become log q, then q, then the gradient); a full-vocabulary
teacher needs the student's log q and q plus the teacher's own buffers. Autograd would keep five
or six. Tests check this against autograd through ``kd_loss``.

With z = s / T, q = softmax(z), the per-row loss is T^2 * D + w * CE(s), hence
d loss / d s = T * dD/dz + w * (softmax(s) - onehot(label)), and for a function of q,
dD/dz_j = q_j * (g_j - sum_i q_i g_i) with g = dD/dq:

- forward KL   D = sum p (log p - log q)                dD/dz = q - p
- reverse KL   D = sum q (log q - log p)                dD/dz = q * (log q - log p - D)
- JSD(beta)    D = beta KL(p||m) + (1-beta) KL(q||m)     g = (1 - beta) * log(q / m)
- top-k: p is zero outside the teacher's top-k; reverse KL uses the student renormalised over the
  top-k (so dD/dz is zero outside it); JSD's rest bin has g = -(1 - beta) log(1 - beta).

softmax(s) at temperature 1 is rebuilt from q: softmax(s) = exp(T log q + T lse_T - lse_1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._base import TopK, plogp_ratio


def loss_and_grad(logits: torch.Tensor, teacher: torch.Tensor | TopK, labels: torch.Tensor | None,
                  kind: str, temperature: float, top_k: int | None, beta: float,
                  ce_weight: float, need_grad: bool, row_mask: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over rows of T^2 * D + ce_weight * CE, d/d logits or None) for logits [n, V].

    ``logits`` is consumed: when it is already in the compute dtype it is overwritten in place.
    ``row_mask`` [n] (bool) keeps only some rows (loss and gradient are zero elsewhere, whatever
    those rows hold).
    """
    T = float(temperature)
    w = float(ce_weight)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    a = logits.to(dtype) if logits.dtype != dtype else logits
    del logits
    ce = lse1 = None
    if w > 0:
        if row_mask is not None:
            labels = torch.where(row_mask, labels, torch.zeros_like(labels))
        lse1 = _logsumexp_rows(a)  # at temperature 1
        ce = lse1.squeeze(-1) - a.gather(-1, labels[:, None]).squeeze(-1)
    if T != 1.0:
        a.div_(T)

    cached = teacher if isinstance(teacher, TopK) else None
    if cached is None and top_k is not None:
        values, ids = torch.topk(teacher.to(dtype), top_k, dim=-1)
        cached = TopK(ids, values)
    if cached is not None:
        ids, values = cached.ids.long(), cached.logprobs.to(dtype)
        if top_k is not None and top_k < ids.shape[-1]:
            values, order = torch.topk(values, top_k, dim=-1)
            ids = ids.gather(-1, order)
        # q in place, without a temporary: a -> z - max -> exp -> / sum
        top = a.amax(-1, keepdim=True)
        a.sub_(top)
        z_k = a.gather(-1, ids)
        total = a.exp_().sum(-1, keepdim=True)
        q = a.div_(total)
        log_total = total.log_()
        log_q_k = z_k - log_total
        d, grad = _sparse(q, log_q_k, top + log_total, lse1, ids, values / T, kind, beta, T, w,
                          need_grad)
    else:
        lse = _logsumexp_rows(a)
        d, grad = _dense(a.sub_(lse), lse, lse1, teacher.to(dtype) / T, kind, beta, T, w,
                         need_grad)
    if ce is not None:
        d = d * (T * T) + w * ce
        if grad is not None:
            grad.scatter_add_(-1, labels[:, None], torch.full_like(grad[:, :1], -w))
    else:
        d = d * (T * T)
    if row_mask is not None:
        d = torch.where(row_mask, d, torch.zeros_like(d))
        if grad is not None:
            grad.masked_fill_(~row_mask[:, None], 0.0)
    return d.sum(), grad


class _FusedKD(torch.autograd.Function):
    """kd_loss_sum on materialised logits [n, V] with the closed-form gradient computed in the
    forward: one extra logits-sized buffer (the gradient) instead of autograd's several."""

    @staticmethod
    def forward(ctx, logits, teacher, labels, row_mask, kind, temperature, top_k, beta, ce_weight):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        work = logits.detach().to(dtype, copy=True)  # the caller's logits are never modified
        loss, grad = loss_and_grad(work, teacher, labels, kind, temperature, top_k, beta,
                                   ce_weight, ctx.needs_input_grad[0], row_mask)
        ctx.grad, ctx.applied, ctx.in_dtype = grad, None, logits.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad = ctx.grad
        # scale in place; a second backward (retain_graph) rescales relative to the first
        grad.mul_(grad_out if ctx.applied is None else grad_out / ctx.applied)
        ctx.applied = grad_out.detach().clone()
        return (grad.to(ctx.in_dtype),) + (None,) * 8


def fused_kd_loss_sum(logits: torch.Tensor, teacher: torch.Tensor | TopK,
                      labels: torch.Tensor | None, row_mask: torch.Tensor | None, kind: str,
                      temperature: float, top_k: int | None, beta: float,
                      ce_weight: float) -> torch.Tensor:
    """Differentiable sum of the per-row loss over logits [n, V] (rows where row_mask)."""
    if isinstance(teacher, TopK):
        teacher = TopK(teacher.ids.detach(), teacher.logprobs.detach())
    else:
        teacher = teacher.detach()
    return _FusedKD.apply(logits, teacher, labels, row_mask, kind, float(temperature), top_k,
                          float(beta), float(ce_weight))


def _logsumexp_rows(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """logsumexp over the last dim [n, 1], in blocks of rows so temporaries stay small."""
    return torch.cat([torch.logsumexp(x[i:i + block], -1, keepdim=True)
                      for i in range(0, x.shape[0], block)]) if x.shape[0] else x.new_zeros(0, 1)


def _sparse(q, log_q_k, lse, lse1, ids, t_k, kind, beta, T, w, need_grad):
    """Top-k teacher. ``q`` (the student's softmax) becomes the gradient in place (without the
    -w onehot of the CE term)."""
    log_p = F.log_softmax(t_k, dim=-1)
    p = log_p.exp()
    # grad = row_scale * q (+ w * softmax_1(s) when T != 1) everywhere, then fixed up at the top-k
    if kind == "forward_kl":
        d = plogp_ratio(p, log_p, log_q_k)
        row_scale, at_k, add_at_k = T, -T * p, True
    elif kind == "reverse_kl":
        log_qh = F.log_softmax(log_q_k, dim=-1)  # student renormalised over the top-k
        qh = log_qh.exp()
        d = plogp_ratio(qh, log_qh, log_p)
        g_k = torch.where(qh > 0, qh * (log_qh - log_p - d[:, None]), torch.zeros_like(qh))
        row_scale, at_k, add_at_k = 0.0, T * g_k, False
    else:
        q_k = log_q_k.exp()
        log1m = math.log1p(-beta)
        log_m = torch.logaddexp(log_p + math.log(beta), log_q_k + log1m)
        g_k = (1 - beta) * (log_q_k - log_m)
        g_out = -(1 - beta) * log1m  # dD/dq outside the top-k (the rest bin)
        q_rest = (q.sum(-1) - q_k.sum(-1)).clamp(min=0)
        qg = (q_k * g_k).sum(-1) + q_rest * g_out  # (1 - beta) KL(q || m), rest bin included
        d = beta * plogp_ratio(p, log_p, log_m) + qg
        row_scale = (T * (g_out - qg))[:, None]
        at_k, add_at_k = T * q_k * (g_k - qg[:, None]), False
    if not need_grad:
        return d, None
    if w > 0 and not add_at_k:  # the top-k entries are overwritten: include their CE part
        at_k = at_k + w * torch.exp(T * (log_q_k + lse) - lse1)
    if w > 0 and T == 1.0:  # softmax_1(s) is q itself
        grad = q.mul_(row_scale + w)
    elif w > 0:  # + w * softmax_1(s) = w * q^T * exp(T lse - lse_1), a block of rows at a time
        factor = torch.exp(T * lse - lse1).mul_(w)
        scale = torch.as_tensor(row_scale, dtype=q.dtype, device=q.device).expand(q.shape[0], 1)
        for i in range(0, q.shape[0], 64):
            rows = q[i:i + 64]
            extra = rows.pow(T).mul_(factor[i:i + 64])
            rows.mul_(scale[i:i + 64]).add_(extra)
        grad = q
    else:
        grad = q.mul_(row_scale)
    return d, (grad.scatter_add_(-1, ids, at_k) if add_at_k else grad.scatter_(-1, ids, at_k))


def _dense(log_q, lse, lse1, t, kind, beta, T, w, need_grad):
    """Full-vocabulary teacher (t = teacher logits / T)."""
    log_p = F.log_softmax(t, dim=-1)
    del t
    p = log_p.exp()
    q = log_q.exp()
    if kind == "forward_kl":
        d = plogp_ratio(p, log_p, log_q)
        grad = q.sub_(p) if need_grad else None
    elif kind == "reverse_kl":
        diff = log_q - log_p
        d = torch.where(q > 0, q * diff, torch.zeros_like(q)).sum(-1)
        grad = q.mul_(diff.sub_(d[:, None])) if need_grad else None
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        kl_pm = plogp_ratio(p, log_p, log_m)
        del p, log_p
        g = log_m.neg_().add_(log_q).mul_(1 - beta)  # (1 - beta) * log(q / m), in place
        qg = torch.where(q > 0, q * g, torch.zeros_like(q)).sum(-1)
        d = beta * kl_pm + qg
        grad = q.mul_(g.sub_(qg[:, None])) if need_grad else None
    if grad is None:
        return d, None
    grad.mul_(T)
    if w > 0:  # + w * softmax_1(s), rebuilt in place from log q
        grad.add_(log_q.add_(lse).mul_(T).sub_(lse1).exp_(), alpha=w)
    return d, grad

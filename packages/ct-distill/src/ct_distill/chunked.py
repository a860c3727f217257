"""KD loss computed in chunks of positions straight from final hidden states.

With a 128k vocabulary the logits of a 4k-token sequence are 2 GB in fp32; the loss needs the
student's logits, its softmax, the teacher's and the gradient, several copies at once. Here the
student logits only ever exist for ``chunk_size`` positions at a time:

- forward: for each chunk, logits = hidden_chunk @ W.T, the per-token loss and, when a gradient is
  needed, d loss / d logits right away in closed form (``fused.loss_and_grad``, in place, about two
  logits-sized buffers per chunk), which is turned into d hidden_chunk (= g @ W) and accumulated
  into d W (+= g.T @ hidden_chunk); the chunk's logits are then dropped;
- backward: the stored gradients are scaled (in place) by the incoming gradient.

So peak memory grows with the chunk, not with the sequence, and the backward does not recompute
anything (three matmuls per chunk, as an unchunked forward + backward). First-order gradients only
(no double backward). Positions whose label is ``ignore_index`` are skipped entirely.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ct_model.batch import ModelOutput
from ct_model.matmul import accumulate_weight_grad, compute_dtype, matmul_in

from .fused import loss_and_grad
from ._base import (IGNORE_INDEX, Teacher, TopK, VocabMismatchError, as_topk, check_options,
                     check_shapes)


# Student output in hidden form: final-normed hidden states [..., H] and output weight [V, H]. The
# same type the native engines hand a loss (ct_model.batch.ModelOutput), so no conversion is needed.
StudentHidden = ModelOutput


class TeacherHidden(NamedTuple):
    """A teacher given as final hidden states [..., H_t] and its output weight [V, H_t].

    Its logits are computed chunk by chunk too, so neither model's full logits are ever held.
    """

    hidden: torch.Tensor
    output_weight: torch.Tensor


@dataclass
class _Plan:
    teacher: object  # Tensor [N, V] | TopK [N, k] | TeacherHidden [N, H_t]
    rows: torch.Tensor | None  # scored row indices into the flattened positions (None: all)
    labels: torch.Tensor | None  # labels of the scored rows
    kind: str
    temperature: float
    top_k: int | None
    beta: float
    ce_weight: float
    chunk_size: int
    retain_grads: bool = False

    def teacher_chunk(self, start: int, end: int):
        rows = slice(start, end) if self.rows is None else self.rows[start:end]

        def take(x: torch.Tensor) -> torch.Tensor:
            return x[rows] if isinstance(rows, slice) else x.index_select(0, rows.to(x.device))

        if isinstance(self.teacher, TeacherHidden):
            with torch.no_grad():
                return F.linear(take(self.teacher.hidden), self.teacher.output_weight)
        if isinstance(self.teacher, TopK):
            return TopK(take(self.teacher.ids), take(self.teacher.logprobs))
        return take(self.teacher)

    def chunk_loss_and_grad(self, h: torch.Tensor, weight: torch.Tensor, start: int, end: int,
                            need_grad: bool):
        teacher = self.teacher_chunk(start, end)
        if isinstance(teacher, torch.Tensor):
            teacher = teacher.to(h.device)
        else:
            teacher = TopK(teacher.ids.to(h.device), teacher.logprobs.to(h.device))
        labels = None if self.labels is None else self.labels[start:end]
        # the chunk's logits are created here and consumed (overwritten in place) by loss_and_grad
        return loss_and_grad(F.linear(h, weight), teacher, labels, self.kind, self.temperature,
                             self.top_k, self.beta, self.ce_weight, need_grad)


class _ChunkedKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, plan: _Plan) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(hidden) if need_h else None
        # accumulate the weight gradient in at least fp32 (bf16 sums over many chunks lose bits);
        # the GEMMs themselves run in the run's compute dtype (bf16 in a bf16 run)
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        dtype = compute_dtype(hidden)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32),
                            device=hidden.device)
        n = hidden.shape[0]
        for start in range(0, n, plan.chunk_size):
            end = min(start + plan.chunk_size, n)
            h = hidden[start:end]
            loss, g = plan.chunk_loss_and_grad(h, weight, start, end, need_h or need_w)
            if g is not None:
                if need_h:
                    grad_h[start:end] = matmul_in(g, weight, dtype).to(grad_h.dtype)
                if need_w:
                    accumulate_weight_grad(grad_w, g, h, dtype)
            total += loss.to(total.dtype)
            del g
        # Kept on ctx (not save_for_backward): backward scales them in place and hands them over,
        # so autograd adopts them as .grad without another weight-sized copy.
        ctx.grads = [grad_h, None if grad_w is None else grad_w.to(weight.dtype)]
        ctx.retain = plan.retain_grads
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.grads is None:
            raise RuntimeError("chunked_kd_loss: backward ran twice; pass retain_grads=True to allow "
                               "it (retain_graph=True, gradcheck)")
        grads = ctx.grads
        if ctx.retain:  # keep ours, hand out scaled copies
            return tuple(None if g is None else g * grad_out.to(g.dtype) for g in grads) + (None,)
        ctx.grads = None
        if not (grad_out.numel() == 1 and bool(grad_out == 1)):
            for g in grads:
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        return grads[0], grads[1], None


def chunked_kd_loss_sum(hidden: torch.Tensor, output_weight: torch.Tensor, teacher: Teacher | TeacherHidden,
                        labels: torch.Tensor | None = None, kind: str = "forward_kl",
                        temperature: float = 1.0, top_k: int | None = None, beta: float = 0.5,
                        ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX,
                        chunk_size: int = 1024, *,
                        retain_grads: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``kd_loss_sum`` on logits = hidden @ output_weight.T, without materialising all logits.

    hidden: [..., H] student final hidden states; output_weight: [V, H]. teacher: full logits
    [..., V], ``TopK`` [..., k] or ``TeacherHidden``. Same semantics and result as
    ``kd_loss_sum(F.linear(hidden, output_weight), teacher, labels, ...)``, gradients included.

    The gradients are computed during the forward (when hidden or output_weight require grad) and
    handed to autograd by the backward, which may then run once; ``retain_grads=True`` allows
    repeated backward passes (``retain_graph=True``, gradcheck) at the cost of one more
    weight-sized copy.
    """
    check_options(kind, temperature, beta, ce_weight, top_k)
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    vocab, width = output_weight.shape
    if hidden.shape[-1] != width:
        raise ValueError(f"hidden size {hidden.shape[-1]} != output_weight's {width}")
    lead = tuple(hidden.shape[:-1])
    h = hidden.reshape(-1, width)
    flat_teacher = _flatten_teacher(teacher, lead, vocab, top_k)
    rows, flat_labels = None, None
    count = torch.tensor(h.shape[0], device=hidden.device)
    if labels is not None:
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} != hidden positions {lead}")
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        rows = valid.nonzero().squeeze(1)
        count = valid.sum()
        h = h.index_select(0, rows)
        flat_labels = flat_labels.index_select(0, rows)
    plan = _Plan(flat_teacher, rows, flat_labels, kind, float(temperature), top_k, beta,
                 float(ce_weight), chunk_size, retain_grads)
    if not torch.is_grad_enabled():
        # autograd.Function sees requires_grad even under no_grad: detach, or the forward
        # would compute gradients nobody asked for (evaluation).
        h, output_weight = h.detach(), output_weight.detach()
    return _ChunkedKD.apply(h, output_weight, plan), count


def chunked_kd_loss(hidden: torch.Tensor, output_weight: torch.Tensor, teacher: Teacher | TeacherHidden,
                    labels: torch.Tensor | None = None, kind: str = "forward_kl",
                    temperature: float = 1.0, top_k: int | None = None, beta: float = 0.5,
                    ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX,
                    chunk_size: int = 1024, *, retain_grads: bool = False) -> torch.Tensor:
    """Mean form of ``chunked_kd_loss_sum`` (equals ``kd_loss`` on the full logits)."""
    total, count = chunked_kd_loss_sum(hidden, output_weight, teacher, labels, kind, temperature,
                                       top_k, beta, ce_weight, ignore_index, chunk_size,
                                       retain_grads=retain_grads)
    return total / count.clamp(min=1).to(total.dtype)


def _flatten_teacher(teacher, lead: tuple, vocab: int, top_k: int | None):
    if isinstance(teacher, TeacherHidden):
        if teacher.output_weight.shape[0] != vocab:
            raise VocabMismatchError(f"teacher vocabulary size {teacher.output_weight.shape[0]} != "
                                     f"student vocabulary size {vocab}")
        if tuple(teacher.hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher hidden positions {tuple(teacher.hidden.shape[:-1])} != student {lead}")
        if top_k is not None and top_k > vocab:
            raise ValueError(f"top_k={top_k} exceeds the vocabulary size {vocab}")
        return TeacherHidden(teacher.hidden.detach().reshape(-1, teacher.hidden.shape[-1]),
                             teacher.output_weight.detach())
    check_shapes(torch.Size(lead + (vocab,)), teacher, None, top_k)
    cached = as_topk(teacher)
    if cached is None:
        return teacher.detach().reshape(-1, vocab)
    k = cached.ids.shape[-1]
    return TopK(cached.ids.reshape(-1, k), cached.logprobs.detach().reshape(-1, k))

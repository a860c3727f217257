"""Cross-entropy straight from final hidden states, chunked over tokens: no [tokens, vocab] logits.

For each chunk of ``chunk_tokens`` scored positions: logits = hidden_chunk @ W.T upcast to fp32,
the loss and, when a gradient is needed, d loss / d logits in closed form (softmax - one_hot),
turned at once into d hidden_chunk (= g @ W) and accumulated into d W (+= g.T @ hidden_chunk); the
chunk's logits are then freed. The backward only scales the stored gradients, so nothing is
recomputed (the same design as ct_distill.chunked for KD). ``chunk_tokens=0`` is the plain
unchunked path, kept for comparison. Returns the SUM over scored tokens (batch.py's convention).

On CUDA, with ``fused="auto"``, a maintained fused kernel (cut-cross-entropy, Liger) replaces the
torch chunked path when one is installed (fused_ce.py); the result is the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .batch import IGNORE_INDEX
from .fused_ce import fused_linear_cross_entropy, pick_kernel
from .matmul import accumulate_weight_grad, compute_dtype, matmul_in


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_tokens: int = 0, fused: str = "auto") -> torch.Tensor:
    """Sum of token CE of ``hidden`` [..., H] projected by ``weight`` [V, H] against ``labels`` [...].

    ``fused`` picks a fused CUDA kernel when ``chunk_tokens > 0`` (see fused_ce.pick_kernel)."""
    if chunk_tokens < 0:
        raise ValueError(f"loss.chunk_tokens must be >= 0, got {chunk_tokens}")
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if chunk_tokens == 0:
        logits = F.linear(hidden, weight).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    kernel = pick_kernel(hidden.device, fused)
    if kernel is not None:
        return fused_linear_cross_entropy(kernel, hidden, weight, labels)
    if not torch.is_grad_enabled():
        # autograd.Function sees requires_grad even under no_grad: detach, or the forward
        # would compute gradients nobody asked for (evaluation).
        hidden, weight = hidden.detach(), weight.detach()
    keep = torch.nonzero(labels != IGNORE_INDEX).reshape(-1)
    return _ChunkedCE.apply(hidden, weight, labels, keep, chunk_tokens)


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, keep, chunk):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.zeros_like(hidden) if need_grad else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        # The three GEMMs per chunk run in the run's compute dtype (bf16 under autocast or with
        # FSDP2's bf16 parameters); softmax, the loss sum and the weight-gradient sum in fp32.
        dtype = compute_dtype(hidden)
        for start in range(0, keep.numel(), chunk):
            idx = keep[start:start + chunk]
            h, y = hidden[idx], labels[idx]
            logits = F.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if need_grad:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(idx.numel(), device=g.device), y] -= 1.0
                d_hidden[idx] = matmul_in(g, weight, dtype).to(hidden.dtype)
                accumulate_weight_grad(d_weight, g, h, dtype)
            del logits
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        d_hidden, d_weight = ctx.saved_tensors
        gh = d_hidden.mul_(grad_out.to(d_hidden.dtype)) if ctx.needs_input_grad[0] else None
        gw = d_weight.mul_(grad_out).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None

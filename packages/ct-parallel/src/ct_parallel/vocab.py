"""The reductions behind ``ct_model.batch.VocabShard`` for a process group (torch.distributed only).

A loss on vocabulary-split logits computes per-rank partial results (sum of exponentials, the
slice's share of a divergence, the logit at a target id when this rank owns it), all-reduces them
and finishes the loss identically on every rank. Two operations carry the gradients right:
``sum`` (forward all-reduce, backward identity: each rank's partial gets the gradient of the sum,
whose consumers are replicated) and ``use_locally`` (forward identity, backward all-reduce: a
replicated value used by every rank's own slice, like the log-sum-exp, collects the gradient of
all those uses). Megatron's ``reduce_from_`` / ``copy_to_tensor_model_parallel_region`` are the
same pair.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ct_model.batch import VocabShard


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def vocab_shard(group, start: int, end: int, cross_entropy=None) -> VocabShard:
    """The shard ``[start, end)`` of this rank in ``group`` (its ranks hold consecutive slices);
    ``cross_entropy``: the layout's vocab-parallel CE kernel, if it has one (VocabShard)."""

    def total(x: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(x, group)

    def maximum(x: torch.Tensor) -> torch.Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out

    def use_locally(x: torch.Tensor) -> torch.Tensor:
        return _SumGradients.apply(x, group)

    return VocabShard(start, end, total, use_locally, maximum, cross_entropy)

"""The batch and loss contract shared by data, losses, engines and the trainer.

Defined here, in the lowest package (ct-data, ct-distill and ct-parallel all build on ct-model), so
that the label that means "not scored" is defined exactly once.

A microbatch is a dict of tensors: ``input_ids`` [B, T], ``labels`` [B, T] (already shifted:
labels[t] is the target of position t; IGNORE_INDEX where nothing is scored), and optionally
``position_ids`` and ``document_ids`` (packed documents) and, per stage, teacher targets.

Loss convention (Megatron's per-token loss): a ``LossFn(microbatch, output)`` returns the SUM of
the per-token loss over the microbatch's scored tokens; engines divide by the scored tokens of the
whole global batch, so the loss does not depend on how the batch is split.

What ``output`` is: logits [B, T, vocab] by default. A loss marked with ``takes_model_output``
receives a ``ModelOutput`` (final hidden states + output weight) from engines that can give one
(the native engines), so it can project in chunks and never hold [B, T, vocab]; engines that only
have logits (megatron) still pass the logits tensor, so such a loss must accept both.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Batch key: each row's global position in the loader's sequence order (step * global batch + row),
# attached by ct_data loaders; teacher caches are written and read by it.
SEQUENCE_INDEX = "sequence_index"
Microbatch = dict[str, torch.Tensor]


class ModelOutput(NamedTuple):
    """A decoder's output before the output layer: what a loss needs to compute logits itself.

    ``hidden``: final-normed hidden states [B, T, H]; ``output_weight``: [vocab, H] (the tied
    embedding or the untied lm_head, as the model holds it: unsharded while inside its forward).
    """

    hidden: torch.Tensor
    output_weight: torch.Tensor

    def logits(self) -> torch.Tensor:
        """The full [B, T, vocab] logits, for losses that want them (the unchunked path)."""
        return F.linear(self.hidden, self.output_weight)


LossOutput = torch.Tensor | ModelOutput
LossFn = Callable[[Microbatch, LossOutput], torch.Tensor]


def takes_model_output(loss_fn: Callable) -> Callable:
    """Mark ``loss_fn`` as accepting a ``ModelOutput`` (engines then skip the logits)."""
    loss_fn.takes_model_output = True
    return loss_fn


def wants_model_output(loss_fn: Callable) -> bool:
    return bool(getattr(loss_fn, "takes_model_output", False))


def next_token_cross_entropy(loss_fn: Callable) -> Callable:
    """Mark ``loss_fn`` as exactly the summed cross-entropy of ``labels`` (IGNORE_INDEX unscored).
    An engine whose logits are split over the vocabulary (megatron tensor parallelism) may then
    compute that loss on its shards itself, never gathering [B, T, vocab]; any other loss gets the
    gathered logits."""
    loss_fn.next_token_cross_entropy = True
    return loss_fn


def is_next_token_cross_entropy(loss_fn: Callable) -> bool:
    return bool(getattr(loss_fn, "next_token_cross_entropy", False))


class VocabShard(NamedTuple):
    """This rank's slice ``[start, end)`` of logits split over the vocabulary (megatron tensor
    parallelism), with the operations that join it to the ranks holding the other slices:

    - ``sum``: rank-local partials -> their sum over the ranks, the same on every rank (backward:
      the identity, as the sum's consumers are then replicated);
    - ``use_locally``: a replicated value (a ``sum`` result) entering rank-local computation on the
      slice, e.g. the log-sum-exp subtracted from the slice's logits (forward: the identity;
      backward: the gradients of every rank's local uses are summed);
    - ``max``: the maximum over the ranks, without gradient (for a stable log-sum-exp).

    Megatron's ``reduce_from_`` / ``copy_to_tensor_model_parallel_region`` are the same pair."""

    start: int
    end: int
    sum: Callable[[torch.Tensor], torch.Tensor]
    use_locally: Callable[[torch.Tensor], torch.Tensor]
    max: Callable[[torch.Tensor], torch.Tensor]


def on_vocab_shards(impl: Callable[[Microbatch, torch.Tensor, VocabShard], torch.Tensor]) -> Callable:
    """Give a loss a way to run on vocabulary-split logits: ``impl(microbatch, local_logits, shard)``
    returns the same loss sum as the loss on the full logits. Engines with split logits call it
    instead of gathering [B, T, vocab]."""

    def mark(loss_fn: Callable) -> Callable:
        loss_fn.on_vocab_shards = impl
        return loss_fn

    return mark


def vocab_shard_impl(loss_fn: Callable) -> Callable | None:
    return getattr(loss_fn, "on_vocab_shards", None)


def scored_tokens(microbatch: Microbatch) -> torch.Tensor:
    """Number of positions whose label is scored (``labels != IGNORE_INDEX``)."""
    return (microbatch["labels"] != IGNORE_INDEX).sum()

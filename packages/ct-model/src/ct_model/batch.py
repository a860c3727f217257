"""The batch and loss contract shared by data, losses, engines and the trainer.

Defined here, in the lowest package (ct-data, ct-distill and ct-parallel all build on ct-model), so
that the label that means "not scored" is defined exactly once.

A microbatch is a dict of tensors: ``input_ids`` [B, T], ``labels`` [B, T] (already shifted:
labels[t] is the target of position t; IGNORE_INDEX where nothing is scored), and optionally
``position_ids`` and ``document_ids`` (packed documents) and, per stage, teacher targets.

Losses (ct_model.loss) return the SUM of the per-token loss over a microbatch's scored tokens;
engines divide by the scored tokens of the whole global batch. What an engine hands a loss besides
the microbatch: logits [B, T, vocab], a ``ModelOutput`` (final hidden states + output weight), or
one rank's slice of vocabulary-split logits with its ``VocabShard``.
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


class VocabShard(NamedTuple):
    """This rank's slice ``[start, end)`` of logits split over the vocabulary (megatron tensor
    parallelism), with the operations that join it to the ranks holding the other slices:

    - ``sum``: rank-local partials -> their sum over the ranks, the same on every rank (backward:
      the identity, as the sum's consumers are then replicated);
    - ``use_locally``: a replicated value (a ``sum`` result) entering rank-local computation on the
      slice, e.g. the log-sum-exp subtracted from the slice's logits (forward: the identity;
      backward: the gradients of every rank's local uses are summed);
    - ``max``: the maximum over the ranks, without gradient (for a stable log-sum-exp).

    Megatron's ``reduce_from_`` / ``copy_to_tensor_model_parallel_region`` are the same pair.

    ``cross_entropy(local_logits, targets) -> per-token CE``: the layout's own vocab-parallel
    cross-entropy kernel when it has one (megatron's; None elsewhere)."""

    start: int
    end: int
    sum: Callable[[torch.Tensor], torch.Tensor]
    use_locally: Callable[[torch.Tensor], torch.Tensor]
    max: Callable[[torch.Tensor], torch.Tensor]
    cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None


def scored_tokens(microbatch: Microbatch) -> torch.Tensor:
    """Number of positions whose label is scored (``labels != IGNORE_INDEX``)."""
    return (microbatch["labels"] != IGNORE_INDEX).sum()

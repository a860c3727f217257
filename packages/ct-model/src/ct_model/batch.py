"""The batch and loss contract shared by data, losses, engines and the trainer.

Defined here, in the lowest package (ct-data, ct-distill and ct-parallel all build on ct-model), so
that the label that means "not scored" is defined exactly once.

A microbatch is a dict of tensors: ``input_ids`` [B, T], ``labels`` [B, T] (already shifted:
labels[t] is the target of position t; IGNORE_INDEX where nothing is scored), and optionally
``position_ids`` and ``document_ids`` (packed documents) and, per stage, teacher targets.

Loss convention (Megatron's per-token loss): a ``LossFn(microbatch, logits)`` returns the SUM of
the per-token loss over the microbatch's scored tokens; engines divide by the scored tokens of the
whole global batch, so the loss does not depend on how the batch is split.
"""

from __future__ import annotations

from typing import Callable

import torch

IGNORE_INDEX = -100
# Batch key: each row's global position in the loader's sequence order (step * global batch + row),
# attached by ct_data loaders; teacher caches are written and read by it.
SEQUENCE_INDEX = "sequence_index"
Microbatch = dict[str, torch.Tensor]
LossFn = Callable[[Microbatch, torch.Tensor], torch.Tensor]


def scored_tokens(microbatch: Microbatch) -> torch.Tensor:
    """Number of positions whose label is scored (``labels != IGNORE_INDEX``)."""
    return (microbatch["labels"] != IGNORE_INDEX).sum()

"""What the trainer does with a rank's batch: split it into microbatches, add the teacher's targets
where the phase has a teacher, and name the loss the engine trains them on."""

from __future__ import annotations

from typing import Callable

import torch
from ct_model.batch import SEQUENCE_INDEX, Microbatch
from ct_model.loss import Loss


class Objective:
    """A batch-to-loss recipe: ``microbatches(batch, size)`` for the engine, and ``loss`` (a
    ``ct_model.loss.Loss``) to run them through. ``annotate`` adds the teacher's targets to a
    microbatch (an online teacher or a teacher cache; None without a teacher)."""

    def __init__(self, loss: Loss, annotate: Callable[[Microbatch], Microbatch] | None = None):
        self.loss = loss
        self.annotate = annotate

    def microbatches(self, batch: Microbatch, micro_batch_size: int) -> list[Microbatch]:
        """Split a rank's batch into microbatches (teacher targets added when there is a teacher).

        The teacher cache is read by each row's global loader position, ``sequence_index``, which
        the loader attaches to every batch; it is dropped before the engine sees the microbatch."""
        rows = batch["input_ids"].shape[0]
        if rows % micro_batch_size:
            raise ValueError(f"rank batch of {rows} rows is not divisible by micro_batch_size={micro_batch_size}")
        if self.annotate is not None and SEQUENCE_INDEX not in batch:
            raise ValueError(f"a teacher needs batches with {SEQUENCE_INDEX!r} (a ct_data loader)")
        out = []
        for start in range(0, rows, micro_batch_size):
            mb = {k: v[start:start + micro_batch_size] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if self.annotate is not None:
                mb = self.annotate(mb)
            mb.pop(SEQUENCE_INDEX, None)
            out.append(mb)
        return out

"""The per-microbatch KD loss the midtrain stage hands to an engine.

The stage adds the teacher's targets to each microbatch (``OnlineTeacher.annotate`` or
``TeacherCacheReader.annotate``) and the engine calls ``loss_fn(microbatch, output)``:

- microbatch keys: "labels" [B, T] (aligned with the logits, ``ignore_index`` = not scored), and
  either "teacher_logits" [B, T, V], or "teacher_topk_ids" [B, T, k] + "teacher_topk_logprobs"
  [B, T, k], or "teacher_hidden" [B, T, H_t] + "teacher_output_weight" [V, H_t];
- output: the student's logits [B, T, V], or ``StudentHidden(hidden [B, T, H], output_weight
  [V, H])`` (= ct_model's ModelOutput, what the native engines pass) for the chunked path
  (``chunk_size`` positions of logits at a time).

It returns (loss_sum, token_count): the sum over scored positions and their number, so the trainer
can normalise over all tokens of the global batch.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from .chunked import StudentHidden, TeacherHidden, chunked_kd_loss_sum
from .losses import IGNORE_INDEX, TopK, check_options, kd_loss_sum
from .vocab_parallel import kd_loss_sum_on_shards
from .teacher import (TEACHER_HIDDEN, TEACHER_LOGITS, TEACHER_OUTPUT_WEIGHT, TEACHER_TOPK_IDS,
                      TEACHER_TOPK_LOGPROBS)


def teacher_from_batch(batch: Mapping[str, torch.Tensor]):
    """The teacher target stored in a microbatch: logits, TopK from the cached keys, or
    TeacherHidden (an online teacher in hidden mode)."""
    if TEACHER_LOGITS in batch:
        return batch[TEACHER_LOGITS]
    if TEACHER_TOPK_IDS in batch and TEACHER_TOPK_LOGPROBS in batch:
        return TopK(batch[TEACHER_TOPK_IDS], batch[TEACHER_TOPK_LOGPROBS])
    if TEACHER_HIDDEN in batch and TEACHER_OUTPUT_WEIGHT in batch:
        return TeacherHidden(batch[TEACHER_HIDDEN], batch[TEACHER_OUTPUT_WEIGHT])
    raise KeyError(f"microbatch has no teacher target: expected {TEACHER_LOGITS!r}, "
                   f"{TEACHER_TOPK_IDS!r} + {TEACHER_TOPK_LOGPROBS!r} or {TEACHER_HIDDEN!r} + "
                   f"{TEACHER_OUTPUT_WEIGHT!r} (keys: {sorted(batch)})")


def _full_teacher_logits(teacher: TeacherHidden, device: torch.device) -> torch.Tensor:
    """A hidden-mode teacher's logits, for the unchunked loss (an engine that passes logits)."""
    with torch.no_grad():
        return F.linear(teacher.hidden, teacher.output_weight).to(device)


def make_kd_loss_fn(kind: str = "forward_kl", temperature: float = 1.0, top_k: int | None = None,
                    beta: float = 0.5, ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX,
                    chunk_size: int = 1024, return_count: bool = True,
                    ) -> Callable[[Mapping[str, torch.Tensor], torch.Tensor | StudentHidden], object]:
    """A ``loss_fn(microbatch, output) -> (loss_sum, token_count)`` for KD (options as ``kd_loss``).

    With ``return_count=False`` it returns loss_sum alone (engines that count scored tokens
    themselves from ``labels != -100``; the count is the same).
    """
    check_options(kind, temperature, beta, ce_weight, top_k)
    options = dict(kind=kind, temperature=temperature, top_k=top_k, beta=beta,
                   ce_weight=ce_weight, ignore_index=ignore_index)

    def loss_fn(batch: Mapping[str, torch.Tensor], output: torch.Tensor | StudentHidden):
        teacher = teacher_from_batch(batch)
        labels = batch.get("labels")
        if isinstance(output, StudentHidden):
            total, count = chunked_kd_loss_sum(output.hidden, output.output_weight, teacher, labels,
                                               chunk_size=chunk_size, **options)
        else:
            if isinstance(teacher, TeacherHidden):
                teacher = _full_teacher_logits(teacher, output.device)
            total, count = kd_loss_sum(output, teacher, labels, **options)
        return (total, count) if return_count else total

    def on_vocab_shards(batch: Mapping[str, torch.Tensor], local_logits: torch.Tensor, shard) -> torch.Tensor:
        """The loss sum from vocabulary-split student logits (megatron TP; ct_model.batch.VocabShard)."""
        teacher = teacher_from_batch(batch)
        if isinstance(teacher, TeacherHidden):
            teacher = _full_teacher_logits(teacher, local_logits.device)
        return kd_loss_sum_on_shards(local_logits, teacher, batch.get("labels"), shard, **options)

    loss_fn.on_vocab_shards = on_vocab_shards  # what ct_model.batch.on_vocab_shards marks
    return loss_fn

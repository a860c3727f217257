"""The distillation losses as ``ct_model.loss.Loss`` objects: what the midtrain phase trains on.

The phase adds the teacher's targets to each microbatch (``OnlineTeacher.annotate`` or
``TeacherCacheReader.annotate``):

- "labels" [B, T] (aligned with the logits, IGNORE_INDEX = not scored), and
- "teacher_logits" [B, T, V], or "teacher_topk_ids" + "teacher_topk_logprobs" [B, T, k] (a cache,
  or top-k truncation), or "teacher_hidden" [B, T, H_t] + "teacher_output_weight" [V, H_t] (an
  online teacher in hidden mode, projected chunk by chunk like the student).

``DistillationLoss`` computes ct-distill's KD (forward/reverse KL, JSD, temperature, top-k, CE
mix) from whatever the engine hands it: hidden states (chunked, chunked.py), logits (losses.py) or
vocabulary shards (vocab_parallel.py), all the same sum. ``ModeloptDistillationLoss`` is the
nvidia-modelopt backend's side: the engine holds the teacher and adds modelopt's KD term; this
loss is the CE part.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from ct_model.batch import Microbatch, ModelOutput, VocabShard
from ct_model.loss import EngineTeacher, Loss, LossInput, cross_entropy_sum

from .chunked import TeacherHidden, chunked_kd_loss_sum
from .losses import TopK, check_options, kd_loss_sum
from .teacher import (TEACHER_HIDDEN, TEACHER_LOGITS, TEACHER_OUTPUT_WEIGHT, TEACHER_TOPK_IDS,
                      TEACHER_TOPK_LOGPROBS)
from .vocab_parallel import kd_loss_sum_on_shards


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


def _teacher_logits_from(batch: Mapping[str, torch.Tensor], device: torch.device):
    """The teacher target for a loss on student logits: a hidden-mode teacher is projected whole."""
    teacher = teacher_from_batch(batch)
    if isinstance(teacher, TeacherHidden):
        with torch.no_grad():
            return F.linear(teacher.hidden, teacher.output_weight).to(device)
    return teacher


class DistillationLoss(Loss):
    """KD of the student against the microbatch's teacher targets (options as ``kd_loss``), summed
    over scored positions. From hidden states it projects ``chunk_tokens`` positions at a time
    (0: the full logits at once)."""

    inputs = frozenset(LossInput)

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, top_k: int | None = None,
                 beta: float = 0.5, ce_weight: float = 0.0, chunk_tokens: int = 1024):
        check_options(kind, temperature, beta, ce_weight, top_k)
        if not (isinstance(chunk_tokens, int) and chunk_tokens >= 0):
            raise ValueError(f"loss.chunk_tokens must be an integer >= 0 (0 = unchunked), got {chunk_tokens!r}")
        self.options = dict(kind=kind, temperature=temperature, top_k=top_k, beta=beta, ce_weight=ce_weight)
        self.chunk_tokens = chunk_tokens

    def from_hidden(self, microbatch: Microbatch, output: ModelOutput) -> torch.Tensor:
        if self.chunk_tokens == 0:
            return self.from_logits(microbatch, output.logits())
        total, _ = chunked_kd_loss_sum(output.hidden, output.output_weight, teacher_from_batch(microbatch),
                                       microbatch.get("labels"), chunk_size=self.chunk_tokens, **self.options)
        return total

    def from_logits(self, microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        teacher = _teacher_logits_from(microbatch, logits.device)
        total, _ = kd_loss_sum(logits, teacher, microbatch.get("labels"), **self.options)
        return total

    def from_vocab_shards(self, microbatch: Microbatch, local_logits: torch.Tensor,
                          shard: VocabShard) -> torch.Tensor:
        teacher = _teacher_logits_from(microbatch, local_logits.device)
        return kd_loss_sum_on_shards(local_logits, teacher, microbatch.get("labels"), shard, **self.options)

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"DistillationLoss({options}, chunk_tokens={self.chunk_tokens})"


class ModeloptDistillationLoss(Loss):
    """``stage.distill.backend=modelopt``: the engine (megatron) holds ``teacher`` inside the
    student's model (nvidia-modelopt's DistillationModel) and adds its KD term, ``kind`` at
    ``temperature``; this loss is the rest, ``ce_weight`` x the summed CE (ct-distill's definition:
    temperature 1, scored positions)."""

    def __init__(self, teacher: torch.nn.Module, kind: str = "forward_kl", temperature: float = 1.0,
                 ce_weight: float = 0.0):
        self.engine_teacher = EngineTeacher(teacher, kind, temperature)
        self.ce_weight = ce_weight

    def from_logits(self, microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        if self.ce_weight == 0:
            return logits.sum() * 0.0  # keeps the graph (and the dtype/device) without a CE
        return self.ce_weight * cross_entropy_sum(microbatch, logits)

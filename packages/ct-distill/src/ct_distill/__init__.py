"""ct_distill: knowledge-distillation losses, online and cached teachers, teacher-logit cache.

Public API:
- losses: ``kd_loss``, ``kd_loss_sum`` (forward_kl / reverse_kl / jsd, temperature, top-k,
  CE mix, ignore_index), ``chunked_kd_loss``, ``chunked_kd_loss_sum`` (from hidden states, in
  chunks of positions), ``kd_loss_sum_on_shards`` (from vocabulary-split logits: megatron TP),
  ``TopK``, ``StudentHidden``, ``TeacherHidden``;
- teachers: ``OnlineTeacher`` (frozen ct-model / HF model), ``TeacherCacheWriter``,
  ``write_teacher_cache``, ``finalize_teacher_cache``, ``wait_for_teacher_cache``,
  ``TeacherCacheReader`` (a cache written by every process of a run, read by any);
- the losses an engine trains (``ct_model.loss.Loss``): ``DistillationLoss``,
  ``ModeloptDistillationLoss`` (loss.py).

Depends on ct-model, torch and safetensors only.
"""

from .cache import (CacheError, CacheMismatchError, IncompleteCacheError, TeacherCacheReader,
                    TeacherCacheWriter, finalize_teacher_cache, sequence_hash, wait_for_teacher_cache,
                    write_teacher_cache)
from .chunked import StudentHidden, TeacherHidden, chunked_kd_loss, chunked_kd_loss_sum
from .loss import DistillationLoss, ModeloptDistillationLoss, teacher_from_batch
from .losses import KINDS, TopK, VocabMismatchError, kd_loss, kd_loss_sum, token_divergence
from .teacher import (TEACHER_HIDDEN, TEACHER_LOGITS, TEACHER_OUTPUT_WEIGHT, TEACHER_TOPK_IDS,
                      TEACHER_TOPK_LOGPROBS, OnlineTeacher, topk_logprobs)
from .vocab_parallel import kd_loss_sum_on_shards

__all__ = [
    "CacheError", "CacheMismatchError", "DistillationLoss", "ModeloptDistillationLoss", "IncompleteCacheError", "KINDS", "OnlineTeacher",
    "StudentHidden", "TEACHER_HIDDEN", "TEACHER_LOGITS", "TEACHER_OUTPUT_WEIGHT", "TEACHER_TOPK_IDS",
    "TEACHER_TOPK_LOGPROBS",
    "TeacherCacheReader", "TeacherCacheWriter", "TeacherHidden", "TopK", "VocabMismatchError",
    "chunked_kd_loss", "chunked_kd_loss_sum", "finalize_teacher_cache", "kd_loss", "kd_loss_sum", "kd_loss_sum_on_shards",
    "sequence_hash", "teacher_from_batch", "token_divergence", "topk_logprobs",
    "wait_for_teacher_cache", "write_teacher_cache",
]

"""A stage is data + loss + schedule. This module holds the loss side of the three stages.

Losses follow the engine convention: ``loss_fn(microbatch, output)`` returns the SUM of token
losses; the engine divides by the scored tokens of the whole global batch. Labels arrive already
shifted (labels[t] is the target of position t), so nothing here shifts.

Losses without full logits: a stage's loss takes a ``ModelOutput`` (final hidden states + output
weight) and, with ``loss.chunk_tokens > 0``, projects ``chunk_tokens`` positions at a time, so no
[micro x seq x vocab] tensor exists (CE: ct_model.chunked_ce; KD: ct_distill.chunked, the online
teacher's hidden states projected per chunk too). Engines that only produce logits (megatron) pass
the logits, and the loss takes the unchunked path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ct_model.batch import (IGNORE_INDEX, SEQUENCE_INDEX, LossFn, LossOutput, Microbatch, ModelOutput,
                            next_token_cross_entropy, takes_model_output)
from ct_model.chunked_ce import linear_cross_entropy
from ct_model.fused_ce import FUSED_CHOICES

STAGES = ("pretrain", "midtrain", "posttrain")
TEACHER_KINDS = ("online", "cached")
KD_BACKENDS = ("ct", "modelopt")
# What modelopt's logits criteria compute (ct_parallel.megatron.modelopt_kd.KINDS; ct-stages keeps
# its own copy so that validating a config imports no megatron).
MODELOPT_KINDS = ("forward_kl", "reverse_kl")


def cross_entropy_sum(microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over scored positions (pretraining; SFT masks labels upstream)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), microbatch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


@dataclass(frozen=True)
class LossConfig:
    """How the stage's loss meets the output layer.

    ``chunk_tokens``: scored positions projected to logits at a time (0 = the full logits at once,
    kept for comparison). 1024 bounds the chunk's fp32 logits to 0.5 GB at a 128k vocabulary
    (LLaMA-3's tokenizer, the recipe's), while a 1024-row projection is still a large enough
    matmul to keep a GPU busy; the KD loss holds ~3 such buffers per chunk (student, gradient,
    teacher). ``fused_kernel``: on CUDA, CE uses cut-cross-entropy or Liger when installed
    ("auto"), never ("off"), or the named one.
    """

    chunk_tokens: int = 1024
    fused_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.chunk_tokens < 0:
            raise ValueError(f"loss.chunk_tokens must be >= 0 (0 = unchunked), got {self.chunk_tokens}")
        if self.fused_kernel not in FUSED_CHOICES:
            raise ValueError(f"loss.fused_kernel must be one of {FUSED_CHOICES}, got {self.fused_kernel!r}")


def make_ce_loss(config: LossConfig) -> LossFn:
    """Next-token CE from a ModelOutput (chunked per ``config``), or from logits (unchunked)."""

    @next_token_cross_entropy  # megatron TP computes it on the vocabulary shards
    @takes_model_output
    def ce_loss(microbatch: Microbatch, output: LossOutput) -> torch.Tensor:
        if isinstance(output, ModelOutput):
            return linear_cross_entropy(output.hidden, output.output_weight, microbatch["labels"],
                                        config.chunk_tokens, config.fused_kernel)
        return cross_entropy_sum(microbatch, output)

    return ce_loss


def make_modelopt_ce_term(distill: "DistillConfig") -> LossFn:
    """backend=modelopt: the midtrain loss's CE part, ``ce_weight`` x summed CE (ct-distill's
    definition: temperature 1, scored positions); the megatron engine adds modelopt's KD term."""
    from ct_parallel import modelopt_kd

    weight = distill.ce_weight

    @modelopt_kd
    def ce_term(microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        if weight == 0:
            return logits.sum() * 0.0  # keeps the graph (and the dtype/device) without a CE
        return weight * cross_entropy_sum(microbatch, logits)

    return ce_term


def make_kd_loss(distill: "DistillConfig", config: LossConfig) -> LossFn:
    """The midtrain KD loss (ct_distill), chunked from a ModelOutput when ``chunk_tokens > 0``."""
    if distill.backend == "modelopt":
        return make_modelopt_ce_term(distill)
    from ct_distill import make_kd_loss_fn

    d = distill
    kd = make_kd_loss_fn(d.kind, d.temperature, d.top_k, d.beta, d.ce_weight,
                         chunk_size=config.chunk_tokens or 1,  # unused at 0 (the logits path)
                         return_count=False)

    @takes_model_output
    def kd_loss(microbatch: Microbatch, output: LossOutput) -> torch.Tensor:
        if isinstance(output, ModelOutput) and config.chunk_tokens == 0:
            output = output.logits()
        return kd(microbatch, output)

    kd_loss.on_vocab_shards = kd.on_vocab_shards  # megatron TP: the KD sum from the vocabulary slices
    return kd_loss


@dataclass(frozen=True)
class DistillConfig:
    """Mid-training KD options (the paper leaves direction, temperature, top-k and CE mix open)."""

    teacher: str = "online"  # online | cached
    teacher_path: str | None = None  # HF directory of the teacher (a previous phase's export)
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    top_k: int | None = None
    beta: float = 0.5
    ce_weight: float = 0.0
    cache_dir: str | None = None  # cached teacher: where the top-k cache lives (default: run_dir/teacher_cache)
    # cached teacher: a process waiting for the others' parts of the cache gives up, naming the
    # missing parts, once none has gained a shard for this many seconds
    cache_wait_s: float = 1800.0
    teacher_dtype: str | None = None
    # ct: ct-distill's losses, every engine; modelopt: nvidia-modelopt's logits distillation
    # (megatron engine, online teacher, forward or reverse KL over the full vocabulary;
    # ct_parallel.megatron.modelopt_kd)
    backend: str = "ct"

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"stage.distill.teacher must be one of {TEACHER_KINDS}, got {self.teacher!r}")
        if not (isinstance(self.cache_wait_s, (int, float)) and self.cache_wait_s >= 0):
            raise ValueError(f"stage.distill.cache_wait_s must be a number of seconds >= 0, got {self.cache_wait_s!r}")
        if self.teacher == "cached" and not self.top_k:
            raise ValueError("stage.distill.top_k must be set when stage.distill.teacher=cached")
        if self.backend not in KD_BACKENDS:
            raise ValueError(f"stage.distill.backend must be one of {KD_BACKENDS}, got {self.backend!r}")
        if self.backend == "modelopt":
            self._check_modelopt()

    def _check_modelopt(self) -> None:
        """What modelopt's LogitsDistillationLoss cannot express is refused naming both keys."""
        if self.teacher != "online":
            raise ValueError(f"stage.distill.backend=modelopt with stage.distill.teacher={self.teacher}: modelopt "
                             "distils from an online teacher only; use stage.distill.teacher=online or backend=ct")
        if self.kind not in MODELOPT_KINDS:
            raise ValueError(f"stage.distill.backend=modelopt with stage.distill.kind={self.kind}: modelopt's "
                             f"logits losses are {MODELOPT_KINDS}; use one of them or backend=ct")
        if self.top_k:
            raise ValueError(f"stage.distill.backend=modelopt with stage.distill.top_k={self.top_k}: modelopt's "
                             "logits loss uses the full vocabulary; set top_k=null or use backend=ct")


@dataclass(frozen=True)
class StageConfig:
    kind: str = "pretrain"
    distill: DistillConfig = DistillConfig()

    def __post_init__(self) -> None:
        if self.kind not in STAGES:
            raise ValueError(f"stage.kind must be one of {STAGES}, got {self.kind!r}")
        if isinstance(self.distill, dict):
            object.__setattr__(self, "distill", DistillConfig(**self.distill))


class Stage:
    """Turns a rank's batch into annotated microbatches and supplies the per-microbatch loss."""

    def __init__(self, config: StageConfig, annotate: Callable[[Microbatch], Microbatch] | None = None,
                 loss: LossConfig = LossConfig()):
        self.config = config
        self.annotate = annotate
        self.loss = loss
        if config.kind == "midtrain":
            self.loss_fn: LossFn = make_kd_loss(config.distill, loss)
        else:
            self.loss_fn = make_ce_loss(loss)

    def microbatches(self, batch: Microbatch, micro_batch_size: int) -> list[Microbatch]:
        """Split a rank's batch into microbatches (teacher targets added when the stage has a teacher).

        The teacher cache is read by each row's global loader position, ``sequence_index``, which
        the loader attaches to every batch; it is dropped before the engine sees the microbatch."""
        rows = batch["input_ids"].shape[0]
        if rows % micro_batch_size:
            raise ValueError(f"rank batch of {rows} rows is not divisible by micro_batch_size={micro_batch_size}")
        if self.annotate is not None and SEQUENCE_INDEX not in batch:
            raise ValueError(f"the {self.config.kind} stage needs batches with {SEQUENCE_INDEX!r} (a ct_data loader)")
        out = []
        for start in range(0, rows, micro_batch_size):
            mb = {k: v[start:start + micro_batch_size] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            if self.annotate is not None:
                mb = self.annotate(mb)
            mb.pop(SEQUENCE_INDEX, None)
            out.append(mb)
        return out

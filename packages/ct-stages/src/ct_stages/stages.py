"""A stage is data + loss + schedule. This module holds the loss side of the three stages.

Losses follow the engine convention: ``loss_fn(microbatch, logits)`` returns the SUM of token
losses; the engine divides by the scored tokens of the whole global batch. Labels arrive already
shifted (labels[t] is the target of position t), so nothing here shifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ct_model.batch import IGNORE_INDEX, SEQUENCE_INDEX, LossFn, Microbatch

STAGES = ("pretrain", "midtrain", "posttrain")
TEACHER_KINDS = ("online", "cached")


def cross_entropy_sum(microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over scored positions (pretraining; SFT masks labels upstream)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), microbatch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


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
    teacher_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.teacher not in TEACHER_KINDS:
            raise ValueError(f"stage.distill.teacher must be one of {TEACHER_KINDS}, got {self.teacher!r}")
        if self.teacher == "cached" and not self.top_k:
            raise ValueError("stage.distill.top_k must be set when stage.distill.teacher=cached")


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

    def __init__(self, config: StageConfig, annotate: Callable[[Microbatch], Microbatch] | None = None):
        self.config = config
        self.annotate = annotate
        if config.kind == "midtrain":
            from ct_distill import make_kd_loss_fn

            d = config.distill
            self.loss_fn: LossFn = make_kd_loss_fn(d.kind, d.temperature, d.top_k, d.beta, d.ce_weight,
                                                   return_count=False)
        else:
            self.loss_fn = cross_entropy_sum

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

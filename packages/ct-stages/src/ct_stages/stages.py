"""The recipe's stages (pretrain, midtrain, posttrain) as configuration, and the loss each trains.

``build_loss`` turns a stage's configuration into the ``ct_model.loss.Loss`` object the engines
call (docs/architecture.md, "From a batch to the loss"): cross-entropy for pretraining and SFT,
ct-distill's KD for mid-training, or the nvidia-modelopt KD backend's CE part. Losses follow the
engine convention: the SUM of token losses over scored positions; the engine divides by the scored
tokens of the whole global batch. Labels arrive already shifted, so nothing here shifts.

With ``loss.chunk_tokens > 0`` a loss handed hidden states (the native engines) projects
``chunk_tokens`` positions at a time, so no [micro x seq x vocab] tensor exists (CE:
ct_model.chunked_ce; KD: ct_distill.chunked, the online teacher's hidden states projected per
chunk too). Engines that only produce logits (megatron) hand logits or vocabulary shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ct_model.fused_ce import FUSED_CHOICES
from ct_model.loss import CrossEntropyLoss, Loss

STAGES = ("pretrain", "midtrain", "posttrain")
TEACHER_KINDS = ("online", "cached")
KD_BACKENDS = ("ct", "modelopt")
# What modelopt's logits criteria compute (ct_parallel.megatron.modelopt_kd.KINDS; ct-stages keeps
# its own copy so that validating a config imports no megatron).
MODELOPT_KINDS = ("forward_kl", "reverse_kl")


@dataclass(frozen=True)
class LossConfig:
    """How the stage's loss meets the output layer.

    ``chunk_tokens``: scored positions projected to logits at a time (0 = the full logits at once,
    kept for comparison). 1024 bounds the chunk's fp32 logits to 0.5 GB at a 128k vocabulary
    (LLaMA-3's tokenizer, the recipe's), while a 1024-row projection is still a large enough
    matmul to keep a GPU busy; the KD loss holds ~3 such buffers per chunk (student, gradient,
    teacher). ``fused_kernel``: on CUDA, CE uses cut-cross-entropy or Liger when installed
    ("auto"), never ("none"), or the named one.
    """

    chunk_tokens: int = 1024
    fused_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.chunk_tokens < 0:
            raise ValueError(f"loss.chunk_tokens must be >= 0 (0 = unchunked), got {self.chunk_tokens}")
        if self.fused_kernel not in FUSED_CHOICES:
            raise ValueError(f"loss.fused_kernel must be one of {FUSED_CHOICES}, got {self.fused_kernel!r}")


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


def build_loss(stage: StageConfig, config: LossConfig = LossConfig(),
               engine_teacher: torch.nn.Module | None = None) -> Loss:
    """The loss ``stage`` trains on. ``engine_teacher``: the teacher model for
    ``stage.distill.backend=modelopt`` (the engine runs it inside the student's model)."""
    if stage.kind != "midtrain":
        return CrossEntropyLoss(config.chunk_tokens, config.fused_kernel)
    d = stage.distill
    if d.backend == "modelopt":
        if engine_teacher is None:
            raise ValueError("stage.distill.backend=modelopt needs the teacher model the engine will hold")
        from ct_distill import ModeloptDistillationLoss

        return ModeloptDistillationLoss(engine_teacher, d.kind, d.temperature, d.ce_weight)
    from ct_distill import DistillationLoss

    return DistillationLoss(d.kind, d.temperature, d.top_k, d.beta, d.ce_weight, chunk_tokens=config.chunk_tokens)

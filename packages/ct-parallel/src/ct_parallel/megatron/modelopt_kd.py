"""nvidia-modelopt as the megatron engine's KD backend (``stage.distill.backend=modelopt``), the
way Megatron-LM distils: the student GPTModel is converted by ``mtd.convert`` into a
``DistillationModel`` that holds the frozen teacher (a GPTModel built from the teacher's ct-model
weights through the same bridge), runs it under no_grad in the same forward, and gives the KD
term from ``compute_kd_loss``.

The criterion is modelopt's ``LogitsDistillationLoss``: per position T^2 * KL(softmax(t/T) ||
softmax(s/T)) summed over the vocabulary with ``reduction="none"`` (its default "mean" would
divide by positions x vocabulary). That is ct-distill's ``forward_kl`` term exactly; the engine
sums it over scored positions (labels != -100), the stage adds its CE term, and the engine
divides by the global scored tokens as for every loss. The criterion sees the full vocabulary,
so tensor and pipeline parallelism are refused (TP would hand it vocabulary slices; PP would need
modelopt's tensor-shape hooks in the schedule).

modelopt is imported here only, lazily: it takes 30-60 s to import on the 2-core CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import DistributedConfig

KINDS = ("forward_kl",)  # what LogitsDistillationLoss computes


def check_layout(dist_config: DistributedConfig) -> None:
    """The layouts this backend runs; ValueError naming the key otherwise."""
    d = dist_config
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(d, key) != 1:
            raise ValueError(f"stage.distill.backend=modelopt runs with distributed.{key}=1 only (got "
                             f"{getattr(d, key)}): its logits criterion needs the whole vocabulary and one "
                             "pipeline stage; use stage.distill.backend=ct, which runs every megatron layout")
    if d.engine != "megatron":
        raise ValueError(f"stage.distill.backend=modelopt needs distributed.engine=megatron, got {d.engine!r}")


@functools.cache
def _criterion_class() -> type:
    import modelopt.torch.distill as mtd

    class Fp32LogitsDistillationLoss(mtd.LogitsDistillationLoss):
        """modelopt's logits KD on fp32 logits (bf16 chunks give bf16 logits; the softmax over the
        vocabulary needs fp32), per position (reduction "none")."""

        def forward(self, logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
            return super().forward(logits_s.float(), logits_t.float())

    return Fp32LogitsDistillationLoss


def convert(student: nn.Module, teacher: nn.Module, temperature: float) -> nn.Module:
    """``student`` (an unwrapped GPTModel, before DDP) converted in place into modelopt's
    DistillationModel around ``teacher``. The criterion pairs the two models' outputs (layer
    name "": the models themselves), i.e. the [B, T, V] logits GPTModel returns."""
    import modelopt.torch.distill as mtd

    criterion = _criterion_class()(temperature=temperature, reduction="none")
    config = {"teacher_model": teacher, "criterion": criterion, "loss_balancer": None}
    return mtd.convert(student, mode=[("kd_loss", config)])


def kd_loss_sum(model: nn.Module, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """modelopt's KD term of the last forward, summed over scored positions [B, T] (the THD path's
    per-position losses [1, B * T] are reshaped row-major, as the batch was flattened)."""
    scored = labels != ignore_index
    return model.compute_kd_loss(
        loss_reduction_fn=lambda per_position: (per_position.reshape(scored.shape) * scored).sum())

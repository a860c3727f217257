"""nvidia-modelopt as the megatron engine's KD backend (``stage.distill.backend=modelopt``), the
way Megatron-LM distils: the student GPTModel is converted by ``mtd.convert`` into a
``DistillationModel`` that holds the frozen teacher (a GPTModel built from the teacher's ct-model
weights through the same bridge), runs it under no_grad in the same forward, and gives the KD
term from ``compute_kd_loss``.

The criterion, by layout:
- TP = 1: modelopt's ``LogitsDistillationLoss`` on the models' outputs (layer ""): per position
  T^2 * KL(softmax(t/T) || softmax(s/T)) summed over the vocabulary with ``reduction="none"`` (its
  default "mean" would divide by positions x vocabulary).
- TP > 1: the logits are split over the vocabulary, so modelopt's Megatron criterion
  ``plugins.megatron.LogitsKLLoss`` on the ``output_layer`` outputs (Megatron-LM's default): the
  softmax normalisers are all-reduced over TP, and each rank's per-position KL covers its slice.
  The slices are summed over TP here (forward all-reduce, backward identity: each rank
  back-propagates its own slice, and modelopt's differentiable all-reduce of the normalisers
  carries the cross-slice terms). It omits Hinton's T^2, which is applied here.
Either is ct-distill's ``forward_kl`` term exactly. ``reverse_kl`` (KL(student || teacher)) is
``LogitsKLLoss(reverse=True)`` at every TP size (LogitsDistillationLoss has no reverse form).
The engine sums the term over scored positions
(labels != -100), the stage adds its CE term, and the engine divides by the global scored tokens as
for every loss. Pipeline parallelism is refused (it would need modelopt's tensor-shape hooks in
the schedule).

modelopt is imported here only, lazily: it takes 30-60 s to import on the 2-core CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..config import DistributedConfig

KINDS = ("forward_kl", "reverse_kl")  # what modelopt's logits criteria compute (ct-distill's names)


def check_layout(dist_config: DistributedConfig) -> None:
    """The layouts this backend runs; ValueError naming the key otherwise."""
    d = dist_config
    if d.pipeline_model_parallel_size != 1:
        raise ValueError(f"stage.distill.backend=modelopt runs with distributed.pipeline_model_parallel_size=1 only "
                         f"(got {d.pipeline_model_parallel_size}): student and teacher activations would have to "
                         "travel together between stages; use stage.distill.backend=ct, which runs every megatron layout")
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


def convert(student: nn.Module, teacher: nn.Module, temperature: float, kind: str = "forward_kl") -> nn.Module:
    """``student`` (an unwrapped GPTModel, before DDP) converted in place into modelopt's
    DistillationModel around ``teacher``. TP = 1: the criterion pairs the two models' outputs
    (layer "": the models themselves), the [B, T, V] logits GPTModel returns; TP > 1: their
    ``output_layer`` outputs, [T, B, V / TP] slices (module docstring); reverse KL likewise."""
    import modelopt.torch.distill as mtd

    if kind not in KINDS:
        raise ValueError(f"stage.distill.kind={kind} with stage.distill.backend=modelopt: modelopt computes {KINDS}")
    if kind == "forward_kl" and student.config.tensor_model_parallel_size == 1:
        criterion = _criterion_class()(temperature=temperature, reduction="none")
    else:
        from modelopt.torch.distill.plugins.megatron import LogitsKLLoss

        loss = LogitsKLLoss(student.config, temperature=temperature, reverse=kind == "reverse_kl")
        criterion = {("output_layer", "output_layer"): loss}
    config = {"teacher_model": teacher, "criterion": criterion, "loss_balancer": None}
    return mtd.convert(student, mode=[("kd_loss", config)])


def kd_loss_sum(model: nn.Module, labels: torch.Tensor, temperature: float, ignore_index: int = -100) -> torch.Tensor:
    """modelopt's KD term of the last forward, summed over scored positions [B, T] (the THD path's
    per-position losses [1, B * T] are reshaped row-major, as the batch was flattened)."""
    scored = labels != ignore_index

    def reduce(loss) -> torch.Tensor:
        if not isinstance(loss, tuple):  # LogitsDistillationLoss: [B, T], T^2 included
            return (loss.reshape(scored.shape) * scored).sum()
        # LogitsKLLoss: ([B, T] KL over this rank's vocabulary slice (all of it at TP = 1),
        # tp_reduce, sequence_parallel)
        per_position = loss[0].reshape(scored.shape) * temperature**2
        return _sum_over_tensor_parallel((per_position * scored).sum())

    return model.compute_kd_loss(loss_reduction_fn=reduce)


def _sum_over_tensor_parallel(x: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() == 1:
        return x
    from ..vocab import vocab_shard

    # Only .sum is used (forward all-reduce, backward identity); the slice bounds do not matter.
    return vocab_shard(ps.get_tensor_model_parallel_group(), 0, 0).sum(x)

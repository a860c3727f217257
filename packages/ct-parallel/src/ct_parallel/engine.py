"""The engine interface: how the trainer runs microbatches without knowing the parallel layout.

The trainer hands an engine a list of microbatches (this rank's share of one global batch) and the
loss to run them through (a ``ct_model.loss.Loss``; a plain ``fn(microbatch, logits)`` is taken as
one); the engine runs forward and backward however its layout requires (single process, DDP,
FSDP2, megatron TP/PP) and returns global metrics. The engine asks the loss what it takes
(``loss.supports``) and hands it the best of what the layout has: hidden states + output weight
(native engines, inside the model's forward), this rank's vocabulary shard (megatron), or logits.

Loss convention (Megatron's per-token loss): the loss returns the SUM of the per-token loss over a
microbatch's scored tokens. The engine divides by the number of scored tokens (``labels != -100``)
of the whole global batch, over all microbatches and all data-parallel ranks, so the loss and the
gradients do not depend on how the global batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

import torch.distributed as dist
from ct_model.batch import IGNORE_INDEX, Microbatch, scored_tokens  # noqa: F401 (re-exported)
from ct_model.loss import Loss

# What engines accept as a loss: a Loss, or a function (microbatch, logits) -> loss sum.
LossFn = Loss | Callable[[Microbatch, torch.Tensor], torch.Tensor]


def to_device(microbatch: Microbatch, device: torch.device) -> Microbatch:
    """``microbatch`` with every tensor on ``device`` (tensors already there are kept as they are).

    On CUDA the copy is asynchronous from pinned memory: a host tensor not already pinned (by the
    loader) is pinned first, so the copies of a step's microbatches queue up behind the compute
    of the step before instead of stalling the host."""
    out = {}
    for key, value in microbatch.items():
        if isinstance(value, torch.Tensor) and value.device != device:
            if device.type == "cuda" and value.device.type == "cpu" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
        out[key] = value
    return out


def global_token_counts(microbatches: list[Microbatch], dp_size: int, dp_group, device: torch.device
                        ) -> tuple[float, float]:
    """(scored tokens, input positions) of the global batch: this rank's microbatches summed on the
    host, then over the data-parallel ranks. Counted before the batch moves to the device, so a
    single process never waits on the device for them; the all-reduce runs on ``device`` (NCCL
    reduces device tensors only)."""
    scored = float(sum(int(scored_tokens(mb)) for mb in microbatches))
    inputs = float(sum(mb["input_ids"].numel() for mb in microbatches))
    if dp_size == 1:
        return scored, inputs
    both = torch.tensor([scored, inputs], dtype=torch.float64, device=device)
    dist.all_reduce(both, group=dp_group)
    scored, inputs = both.tolist()
    return scored, inputs


@dataclass
class StepResult:
    loss: float  # mean per-token loss over the global batch
    tokens: int  # scored tokens in the global batch (labels != -100)
    input_tokens: int  # all input positions in the global batch (for throughput)
    # MoE sequence-wise balance term (coeff x loss, per-token mean) when moe_aux_loss_coeff > 0;
    # trained on together with ``loss`` but not part of it.
    aux_loss: float | None = None


class Engine(Protocol):
    """What the trainer needs from an engine. See NativeEngine for the reference implementation."""

    dp_rank: int
    dp_size: int
    optimizer: torch.optim.Optimizer | None

    def setup_optimizer(self, build: Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer]) -> torch.optim.Optimizer: ...

    def forward_backward(self, microbatches: list[Microbatch], loss_fn: LossFn) -> StepResult: ...

    def forward_only(self, microbatches: list[Microbatch], loss_fn: LossFn) -> StepResult: ...

    def clip_grad_norm(self, max_norm: float | None) -> float: ...

    def optimizer_step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def save_checkpoint(self, path: str, *, asynchronous: bool = False) -> Any: ...  # a Future when asynchronous

    def load_checkpoint(self, path: str, *, load_optimizer: bool = True) -> None: ...

    # Both below: a tensor the process holds whole on the CPU may be the live parameter itself
    # (no copy is made where none is needed): clone what must outlive the next optimizer step.
    def full_model_state_dict(self) -> dict[str, torch.Tensor] | None: ...

    # (ct-model name, full CPU tensor) one at a time on the main rank; collective (every rank
    # iterates in lockstep): what the HF export streams, never the whole model in one process.
    def full_state_items(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    # Optional (native engines): MoE expert-bias update after each optimizer step, returning the
    # per-layer load metrics; the trainer calls it when the engine has it.
    # def update_expert_bias(self) -> dict[str, float]: ...

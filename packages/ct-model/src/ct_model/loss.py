"""The loss an engine trains: one object, asked what it can take, handed what the layout has.

This is the home of "the loss" (torchtitan's ``components/loss.py`` shape). It lives in ct-model,
the lowest package every engine and every loss implementation already depends on: the engines
(ct-parallel) only know this interface, cross-entropy is here (its kernels, chunked_ce.py and
fused_ce.py, are ct-model's), and the distillation losses (ct-distill) are subclasses.

Convention (Megatron's per-token loss): every method returns the SUM of the per-token loss over
the microbatch's scored tokens (``labels != IGNORE_INDEX``); the engine divides by the scored
tokens of the whole global batch, so the loss does not depend on how the batch is split.

What an engine can hand a loss (``LossInput``), best first:

- ``HIDDEN``: the final hidden states and the output weight (``ModelOutput``). The native engines
  run the loss as the model's output head, so a chunked loss never holds [B, T, vocab] logits.
- ``VOCAB_SHARDS``: this rank's slice of logits split over the vocabulary, with the collectives
  that join the slices (``VocabShard``; megatron tensor parallelism, and TP=1 as one shard).
- ``LOGITS``: the full [B, T, vocab] logits. Every loss takes them.

An engine asks ``loss.supports(kind)`` and calls ``from_hidden`` / ``from_vocab_shards`` /
``from_logits``; nothing is read off function attributes. A plain ``fn(microbatch, logits)`` is a
loss too (``as_loss`` wraps it), which is how tests and tools write one-off losses.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from .batch import IGNORE_INDEX, Microbatch, ModelOutput, VocabShard
from .chunked_ce import linear_cross_entropy
from .fused_ce import FUSED_CHOICES, pick_kernel

log = logging.getLogger(__name__)


class LossInput(enum.Enum):
    HIDDEN = "hidden"
    VOCAB_SHARDS = "vocab_shards"
    LOGITS = "logits"


@dataclass(frozen=True)
class EngineTeacher:
    """A teacher the engine itself must hold and run inside the student's forward (nvidia-modelopt's
    DistillationModel on the megatron engine): the engine adds its KD term, ``kind`` at
    ``temperature``, to the loss's own (CE) term."""

    model: torch.nn.Module
    kind: str = "forward_kl"
    temperature: float = 1.0


class Loss:
    """A microbatch's loss sum. Subclasses set ``inputs`` and implement the matching methods."""

    inputs: frozenset[LossInput] = frozenset({LossInput.LOGITS})
    # Set by a loss that needs the engine's help (a teacher inside the model); engines that cannot
    # hold one refuse such a loss when they are built or called.
    engine_teacher: EngineTeacher | None = None

    def supports(self, kind: LossInput) -> bool:
        return kind in self.inputs

    def from_logits(self, microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def from_hidden(self, microbatch: Microbatch, output: ModelOutput) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not take hidden states")

    def from_vocab_shards(self, microbatch: Microbatch, local_logits: torch.Tensor,
                          shard: VocabShard) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not take vocabulary shards")

    def __call__(self, microbatch: Microbatch, output: torch.Tensor | ModelOutput) -> torch.Tensor:
        """The loss on whatever ``output`` is: a reference call for tests and evaluation code."""
        if isinstance(output, ModelOutput):
            if self.supports(LossInput.HIDDEN):
                return self.from_hidden(microbatch, output)
            output = output.logits()
        return self.from_logits(microbatch, output)


class FunctionLoss(Loss):
    """A plain ``fn(microbatch, logits) -> loss sum`` as a Loss (full logits only)."""

    def __init__(self, fn: Callable[[Microbatch, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def from_logits(self, microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(microbatch, logits)


def as_loss(loss: Loss | Callable[[Microbatch, torch.Tensor], torch.Tensor]) -> Loss:
    """``loss`` as a Loss: a Loss is itself, a function of (microbatch, logits) is wrapped."""
    if isinstance(loss, Loss):
        return loss
    if not callable(loss):
        raise TypeError(f"a loss is a ct_model.loss.Loss or a function (microbatch, logits) -> sum, got {loss!r}")
    return FunctionLoss(loss)


def cross_entropy_sum(microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
    """Next-token CE summed over scored positions (labels are already shifted), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), microbatch["labels"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def vocab_parallel_cross_entropy_sum(microbatch: Microbatch, local_logits: torch.Tensor,
                                     shard: VocabShard) -> torch.Tensor:
    """Next-token CE summed over scored positions from this rank's vocabulary slice, by the layout's
    own kernel (``shard.cross_entropy``: megatron's, which keeps one fp32 copy of the slice)."""
    if shard.cross_entropy is None:
        raise ValueError("this vocabulary shard carries no cross-entropy kernel (VocabShard.cross_entropy)")
    labels = microbatch["labels"]
    scored = labels != IGNORE_INDEX
    per_token = shard.cross_entropy(local_logits, labels.masked_fill(~scored, 0))
    return (per_token * scored).sum()


@lru_cache(maxsize=None)
def _log_kernel_once(kernel: str | None, device_type: str) -> None:
    log.info("loss: cross-entropy on %s by %s", device_type, kernel or "the torch chunked path")


class CrossEntropyLoss(Loss):
    """Next-token cross-entropy. From hidden states it projects ``chunk_tokens`` scored positions at
    a time (0: the full logits at once), or runs a fused CUDA kernel (``fused_kernel``: "auto" picks
    an installed one on CUDA, "none" never, or a kernel's name; see fused_ce.py)."""

    inputs = frozenset(LossInput)

    def __init__(self, chunk_tokens: int = 1024, fused_kernel: str = "auto"):
        if chunk_tokens < 0:
            raise ValueError(f"loss.chunk_tokens must be >= 0 (0 = unchunked), got {chunk_tokens}")
        if fused_kernel not in FUSED_CHOICES:
            raise ValueError(f"loss.fused_kernel must be one of {FUSED_CHOICES}, got {fused_kernel!r}")
        self.chunk_tokens = chunk_tokens
        self.fused_kernel = fused_kernel

    def from_hidden(self, microbatch: Microbatch, output: ModelOutput) -> torch.Tensor:
        if self.chunk_tokens:
            _log_kernel_once(pick_kernel(output.hidden.device, self.fused_kernel), output.hidden.device.type)
        return linear_cross_entropy(output.hidden, output.output_weight, microbatch["labels"],
                                    self.chunk_tokens, self.fused_kernel)

    def from_logits(self, microbatch: Microbatch, logits: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(microbatch, logits)

    def from_vocab_shards(self, microbatch: Microbatch, local_logits: torch.Tensor,
                          shard: VocabShard) -> torch.Tensor:
        return vocab_parallel_cross_entropy_sum(microbatch, local_logits, shard)

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(chunk_tokens={self.chunk_tokens}, fused_kernel={self.fused_kernel!r})"


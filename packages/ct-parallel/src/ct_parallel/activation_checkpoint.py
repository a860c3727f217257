"""Activation checkpointing of a ct-model Decoder's blocks, applied from outside the model.

``activation_checkpointing.mode``:

- ``none``: every activation is kept for backward.
- ``full``: a checkpointed block keeps only its inputs and recomputes its whole forward in
  backward. ``every_n_blocks=N`` checkpoints blocks 0, N, 2N, ... (torchtitan's layer-level
  frequency): N=1 is the least memory, larger N trades memory for less recompute.
- ``selective``: per-op selective checkpointing (torch's ``create_selective_checkpoint_contexts``,
  as torchtitan's op-level SAC): the outputs of every GEMM (plain, FP8 scaled, grouped) and every
  attention kernel (SDPA's, flash/cuDNN, varlen, flex) are saved (``SAVED_OP_NAMES``), everything
  else (norms, RoPE, SiLU, products, reshapes, FP8 casts) is recomputed. The expensive ops never
  run twice; the cheap, memory-heavy elementwise outputs are not stored. ``every_n_blocks``
  applies here too.

How blocks are wrapped: each chosen block's class is swapped for a subclass whose ``forward`` runs
the original one under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` (the approach
FSDP2's ``fully_shard`` itself uses). Unlike torch's ``checkpoint_wrapper`` this adds no
``_checkpoint_wrapped_module.`` level, so parameter names, ``state_dict`` keys, DCP checkpoints,
the optimizer's named parameters and the HF export are exactly those of the unwrapped model.
Without gradients (evaluation, generation with a KV cache) the block runs plainly: there is
nothing to save, and a recompute must not append to the cache twice.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import torch
from ct_model.config import from_known_fields
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

# The ops whose outputs selective checkpointing saves, as "namespace::name" (their default
# overload). What reaches the policy depends on the path, so each family is listed whole:
# - GEMMs. Eager FP8 (torchao Float8Linear) shows the policy aten.mm on float8 tensor subclasses
#   (dispatch modes run before subclasses); compiled, the joint graph holds what torchao's
#   subclass calls: aten._scaled_mm (tensorwise, rowwise and MXFP8 linears all end there). MoE
#   experts: aten._grouped_mm (bf16, ct-model's CUDA path) and aten._scaled_grouped_mm (torchao's
#   FP8/MXFP8 grouped GEMMs). The _v2 ops are what torch.nn.functional.scaled_mm /
#   scaled_grouped_mm call (torchao's blockwise-FP8 and FP4 paths).
# - Attention. SDPA's kernels; varlen_attn (packed documents on CUDA) is the custom op
#   torch_attn::_varlen_attn, which calls aten::_flash_attention_forward or
#   aten::_cudnn_attention_forward (listed too, for code that calls them directly); flex attention
#   is a higher-order op (higher_order::flex_attention).
# - aten::max: FP8 tensorwise scaling's amax, one scalar per cast (torchtitan saves it too): the
#   recompute then skips a full read of the activation to find its scale.
# A name that no longer resolves fails tests/test_activation_checkpoint.py rather than silently
# recomputing a GEMM; at run time it is skipped (MISSING_SAVED_OPS) so an older torch still runs.
SAVED_OP_NAMES = (
    "aten::mm", "aten::addmm", "aten::bmm",
    "aten::_scaled_mm", "aten::_scaled_mm_v2",
    "aten::_grouped_mm", "aten::_scaled_grouped_mm", "aten::_scaled_grouped_mm_v2",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
    "aten::_flash_attention_forward", "aten::_efficient_attention_forward", "aten::_cudnn_attention_forward",
    "torch_attn::_varlen_attn",
    "higher_order::flex_attention",
    "aten::max",
)


def resolve_op(qualified: str):
    """``namespace::name`` -> the op the selective policy receives (an OpOverload's default, or a
    higher-order op). Raises AttributeError when this torch has no such op."""
    namespace, name = qualified.split("::")
    if namespace == "torch_attn":
        importlib.import_module("torch.nn.attention.varlen")  # registers the torch_attn custom ops
    packet = getattr(getattr(torch.ops, namespace), name)
    return packet if namespace == "higher_order" else packet.default


def _saved_ops() -> tuple[frozenset, tuple[str, ...]]:
    ops, missing = set(), []
    for qualified in SAVED_OP_NAMES:
        try:
            ops.add(resolve_op(qualified))
        except (AttributeError, ImportError):
            missing.append(qualified)
    return frozenset(ops), tuple(missing)


SAVED_OPS, MISSING_SAVED_OPS = _saved_ops()


@dataclass(frozen=True)
class ActivationCheckpointConfig:
    mode: str = "none"
    # Checkpoint blocks 0, N, 2N, ... only (1: every block).
    every_n_blocks: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"activation_checkpointing.mode must be one of {MODES}, got {self.mode!r}")
        n = self.every_n_blocks
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"activation_checkpointing.every_n_blocks must be an integer >= 1, got {n!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def checkpoints_block(self, index: int) -> bool:
        return self.enabled and index % self.every_n_blocks == 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ActivationCheckpointConfig":
        return from_known_fields(cls, values, "activation_checkpointing config")


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save GEMM and attention outputs (``SAVED_OPS``); recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(selective_policy)


@functools.cache
def checkpointed_class(cls: type, mode: str) -> type:
    """``cls`` with its forward run under activation checkpointing (one class per (cls, mode))."""
    context_fn = _selective_contexts if mode == "selective" else None

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return cls.forward(self, *args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(cls.forward, self, *args, use_reentrant=False, **extra, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "_ct_checkpoint_mode": mode})


def is_checkpointed(module: nn.Module) -> str | None:
    """The checkpoint mode a module runs under, or None."""
    return getattr(type(module), "_ct_checkpoint_mode", None)


def apply_activation_checkpointing(model: nn.Module, config: ActivationCheckpointConfig) -> nn.Module:
    """Checkpoint the chosen blocks of ``model.layers`` in place (before FSDP wrapping / compile).

    Returns ``model``. Applying twice is refused: nested checkpoints would recompute twice."""
    if not config.enabled:
        return model
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"activation checkpointing needs a model with a `layers` ModuleList (a ct-model Decoder), "
                        f"got {type(model).__name__}")
    for index, block in enumerate(layers):
        if is_checkpointed(block):
            raise ValueError(f"block {index} is already checkpointed ({is_checkpointed(block)})")
        if config.checkpoints_block(index):
            block.__class__ = checkpointed_class(type(block), config.mode)
    return model

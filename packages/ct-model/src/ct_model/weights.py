"""Where a model's weights come from, read one slice at a time, and how they reach its parameters.

A *weight source* (``SeededInit`` in ct_model.init, ``HFWeights`` in ct_model.hf) answers, for
every state-dict name of a ct-model Decoder, ``shape(name)``, ``rows(name, start, stop)`` (a slice
along dimension 0, on the CPU) and ``full(name)``. ``load_into`` fills a model from one: each
parameter gets exactly the part this process holds (the whole tensor, or, for a DTensor sharded
by FSDP2 or tensor parallelism, its local shard), so a process never holds more than one full
parameter at a time beyond its own shards, and a dimension-0 shard (FSDP2's) is read as just its
rows. This is the second half of building on the ``meta`` device: build, parallelize, then
``to_empty`` and ``load_into``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .errors import UserError


class WeightsMismatch(UserError, KeyError):
    """The weights do not fit the model: names missing or unexpected, or a shape differs."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightSource(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def full(self, name: str) -> torch.Tensor: ...


class ModuleWeights:
    """A materialised model's own tensors as a weight source (read in place, copied to the CPU a
    slice at a time)."""

    def __init__(self, model: nn.Module):
        keys = set(model.state_dict())
        self.tensors = {k: v for k, v in state_tensors(model).items() if k in keys}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.tensors[name].detach()[start:stop].cpu()

    def full(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach().cpu()


class DictWeights(ModuleWeights):
    """A state dict (name -> tensor) as a weight source."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.tensors = dict(state)


def as_source(weights) -> WeightSource:
    """``weights`` as a weight source: a source as it is, a state dict wrapped."""
    return DictWeights(weights) if isinstance(weights, dict) else weights


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by state-dict name (tied weights once, under their first name)."""
    return dict([*model.named_parameters(), *model.named_buffers()])


@torch.no_grad()
def load_into(model: nn.Module, source: WeightSource, strict: bool = True) -> None:
    """Copy ``source`` into ``model``'s (materialised, possibly sharded) parameters and buffers.

    ``strict``: the source must name exactly the model's persistent tensors (non-persistent
    buffers such as MoE token counts are zeroed when the source lacks them)."""
    targets = state_tensors(model)
    persistent = set(model.state_dict())
    available = set(source.names())
    missing = sorted(n for n in targets if n in persistent and n not in available)
    unexpected = sorted(n for n in available if n not in targets)
    if strict and (missing or unexpected):
        raise WeightsMismatch(f"{_describe(source)}: weights missing {missing[:5]} / unexpected {unexpected[:5]} "
                              f"for a {type(model).__name__} of this configuration")
    for name, tensor in targets.items():
        if name in available:
            _fill(tensor, name, source)
        elif name not in persistent:
            tensor.zero_()


def _fill(tensor: torch.Tensor, name: str, source: WeightSource) -> None:
    want = tuple(source.shape(name))
    if tuple(tensor.shape) != want:
        raise WeightsMismatch(f"{_describe(source)}: {name} has shape {want}, the model's is {tuple(tensor.shape)}")
    local = _local_part(tensor, name, source)
    target = tensor.to_local() if _is_dtensor(tensor) else tensor
    target.copy_(local.to(target.dtype))


def _describe(source) -> str:
    root = getattr(source, "root", None)
    return str(root) if root is not None else type(source).__name__


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local_part(tensor: torch.Tensor, name: str, source: WeightSource) -> torch.Tensor:
    """This process's part of ``name``: all of it, the rows of a dimension-0 shard, or (other
    placements) the full tensor sliced as DTensor's own rules slice it."""
    if not _is_dtensor(tensor):
        return source.full(name)
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tensor.placements
    if all(p.is_replicate() or (isinstance(p, Shard) and p.dim == 0) for p in placements) and tensor.dim() > 0:
        local_shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, placements)
        return source.rows(name, offset[0], offset[0] + local_shape[0])
    full = source.full(name).to(tensor.device)
    return distribute_tensor(full, tensor.device_mesh, placements, src_data_rank=None).to_local()

"""Initialisation that does not depend on the parallel layout, computed one slice at a time.

A parameter's initial values are a function of (seed, parameter name, position) only: its rows
(dimension 0; experts for the 3D MoE tensors) are cut into fixed blocks of about
``BLOCK_ELEMENTS`` values, and each block is drawn from a CPU generator seeded by a hash of
(seed, name, block index). So any rank can compute exactly the rows it holds (an FSDP2 shard, a
tensor-parallel slice, an expert-parallel group of experts) without drawing, or holding, the rest,
and the model is the same whether it is built whole in one process, sharded over 2 processes or
split over 2048: the same seed gives the same weights at every world size and layout. Drawing on
the CPU keeps the values the same on every device too (a CUDA generator draws other numbers).

The rules follow megatron-core and the MobileLLM recipe: every matrix (linear and embedding
weights, routers, expert tensors) normal(0, ``init_method_std``), norm weights one, buffers
(MoE expert bias and token counts) zero.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import nn

BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class InitRule:
    kind: str  # "normal" | "ones" | "zeros"
    std: float = 0.0


def init_rules(model: nn.Module) -> dict[str, InitRule]:
    """The rule of every parameter and buffer of a ct-model Decoder, by state-dict name (works on
    a ``meta`` model: only module types and names are read)."""
    from .layers import RMSNorm
    from .moe import MoE, Router

    std = model.config.init_method_std
    rules: dict[str, InitRule] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, RMSNorm):
                rule = InitRule("ones")
            elif isinstance(module, (nn.Linear, nn.Embedding, Router, MoE)):
                rule = InitRule("normal", std)
            else:
                raise TypeError(f"no initialisation rule for parameter {prefix}{name} of a {type(module).__name__}")
            rules[prefix + name] = rule
        for name, _ in module.named_buffers(recurse=False):
            rules[prefix + name] = InitRule("zeros")
    return rules


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rows_per_block(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def init_rows(rule: InitRule, name: str, shape: tuple[int, ...], seed: int, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of parameter ``name`` (full shape ``shape``), fp32 on the CPU: the
    same values whichever slice is asked for (``init_rows(..., 0, n)[a:b] == init_rows(..., a, b)``)."""
    shape = tuple(shape)
    if not shape:  # a 0-d tensor: one "row"
        return init_rows(rule, name, (1,), seed)[0]
    stop = shape[0] if stop is None else stop
    if not 0 <= start <= stop <= shape[0]:
        raise ValueError(f"{name}: rows [{start}, {stop}) outside [0, {shape[0]})")
    out_shape = (stop - start, *shape[1:])
    if rule.kind == "ones":
        return torch.ones(out_shape)
    if rule.kind == "zeros":
        return torch.zeros(out_shape)
    if rule.kind != "normal":
        raise ValueError(f"{name}: unknown initialisation {rule.kind!r}")
    per = rows_per_block(shape)
    out = torch.empty(out_shape)
    for block in range(start // per, -(-stop // per)):
        first, last = block * per, min((block + 1) * per, shape[0])
        generator = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.empty((last - first, *shape[1:])).normal_(0.0, rule.std, generator=generator)
        lo, hi = max(first, start), min(last, stop)
        out[lo - start:hi - start] = values[lo - first:hi - first]
    return out


class SeededInit:
    """A weight source (see ct_model.weights) of fresh initial values for ``model``'s parameters and
    buffers: ``rows(name, a, b)`` and ``full(name)``, computed on demand, one slice at a time."""

    def __init__(self, model: nn.Module, seed: int):
        self.seed = int(seed)
        self.rules = init_rules(model)
        self.shapes = {name: tuple(t.shape) for name, t in
                       [*model.named_parameters(), *model.named_buffers()]}

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return init_rows(self.rules[name], name, self.shapes[name], self.seed, start, stop)

    def full(self, name: str) -> torch.Tensor:
        return init_rows(self.rules[name], name, self.shapes[name], self.seed)

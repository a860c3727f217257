"""How one of our state-dict tensors is read from an HF checkpoint's file tensors: the entries of
the read plan that each format module (hf_llama, hf_deepseek) builds and ``hf.HFWeights`` follows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rename:
    """One of our tensors is one file tensor."""

    key: str

    def shape(self, shape_of) -> tuple[int, ...]:
        return shape_of(self.key)

    def rows(self, read, start: int, stop: int) -> torch.Tensor:
        return read(self.key, start, stop)


@dataclass(frozen=True)
class StackExperts:
    """A 3D expert tensor [E, ...]: expert j is its file tensors ``parts[j]`` joined along rows."""

    parts: tuple[tuple[str, ...], ...]

    def shape(self, shape_of) -> tuple[int, ...]:
        first = [shape_of(k) for k in self.parts[0]]
        return (len(self.parts), sum(s[0] for s in first), *first[0][1:])

    def rows(self, read, start: int, stop: int) -> torch.Tensor:
        return torch.stack([torch.cat([read(k, 0, None) for k in self.parts[j]]) for j in range(start, stop)])

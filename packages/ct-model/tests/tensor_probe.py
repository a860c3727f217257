"""A dispatch-level probe of tensor sizes: what memory claims ("no T x T tensor", "no B x T x vocab
tensor") are tested with, independent of the allocator. A test helper: ct-model's tests reach it
through their conftest, other packages' tests put this directory on sys.path."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out

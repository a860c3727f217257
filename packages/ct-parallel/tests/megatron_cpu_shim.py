"""TEST-ONLY shim that lets megatron-core run on a CPU-only machine (gloo).

megatron-core calls CUDA unconditionally in places (device arguments, RNG tracker state, streams,
``device="cuda"`` tensor factories, ``Tensor.type()`` string checks against ``torch.cuda.*``).
This module redirects exactly those to the CPU. It is imported by the test launchers in this
directory only; no shipped package imports it. Pinned to megatron-core ``PINNED_VERSION``:
``check()`` (run by the canary test) fails loudly when an upgrade moves the patched targets.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os

import torch
from torch.overrides import TorchFunctionMode

PINNED_VERSION = "0.19.2"

_FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.rand, torch.randn,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.as_tensor, torch.randint,
}


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True
    return torch.device(device).type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device='cuda' in tensor factories, makes .cuda()/.to('cuda') no-ops, and answers
    ``Tensor.type()`` as megatron's CUDA string checks expect."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.to:
            if args[1:] and not isinstance(args[1], (torch.Tensor, torch.dtype)) and _is_cuda(args[1]):
                args = (args[0], "cpu", *args[2:])
            if _is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": "cpu"}
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def elapsed_time(self, *args):
        return 0.0


_MODE: _CudaToCpu | None = None


def check() -> None:
    """Fail loudly if megatron-core is not the version this shim was written against, or a
    patched target moved."""
    version = importlib.metadata.version("megatron-core")
    if version != PINNED_VERSION:
        raise RuntimeError(f"megatron-core {version} installed; the CPU test shim is written for {PINNED_VERSION}. "
                           "Re-verify packages/ct-parallel/tests/megatron_cpu_shim.py and bump PINNED_VERSION.")
    from megatron.core.tensor_parallel import random as mrandom

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state", "CudaRNGStatesTracker"):
        if not hasattr(mrandom, name):
            raise RuntimeError(f"megatron.core.tensor_parallel.random.{name} is gone: the CPU shim needs updating")


def _all_to_all_single_with_list_splits(original):
    """The MoE alltoall dispatcher's split sizes: on GPU megatron turns its CUDA count tensors into
    numpy arrays (moe_utils.maybe_move_tensor_to_cpu(as_numpy=True)); CPU tensors stay tensors,
    which c10d's binding rejects. Lists are what it takes. (A module attribute, not the torch
    function mode: the dispatcher's backward runs it too, where the mode is not active.)"""

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        def as_list(sizes):
            return sizes.tolist() if torch.is_tensor(sizes) else sizes

        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), *args, **kwargs)

    return all_to_all_single


def install() -> None:
    """Patch torch.cuda and megatron for CPU; idempotent. Call before building megatron models."""
    global _MODE
    if _MODE is not None:
        return
    # Tells ct_stages.run that megatron may run without CUDA (the shipped code refuses otherwise).
    os.environ["CT_MEGATRON_CPU_SHIM"] = "1"
    if torch.cuda.is_available():
        return  # a real GPU: nothing to redirect
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    torch.distributed.all_to_all_single = _all_to_all_single_with_list_splits(torch.distributed.all_to_all_single)
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None  # keep the CPU generator untouched
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.empty_cache = lambda: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None

    check()
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _MODE = _CudaToCpu()
    _MODE.__enter__()

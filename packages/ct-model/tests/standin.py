"""The CPU standing in for a GPU: catch tensors left on the host without a GPU (tests and CI).

On a GPU machine the loader's batches live in host memory and the model on the device, and an
op that mixes the two fails. On a CPU-only machine both are "cpu", so a batch never moved to the
device goes unnoticed. ``StandInDevice`` brings the distinction back: tensors made on the host are
marked ``HostTensor`` (the batches handed to an engine, and what factory functions such as
``torch.tensor`` / ``torch.zeros`` make without a ``device=``), everything else (parameters, what a
``.to(device)`` / ``device=`` call made) counts as on the device, and an op that mixes the two
raises as CUDA would: "expected all tensors to be on the same device".

Rules, as CUDA applies them:
- a host tensor with at least one dimension may not meet a device tensor in an op, except in
  ``copy_`` (host -> device copies) and indexing (``x[idx]`` accepts host indices);
- a 0-dim host tensor may meet device tensors in elementwise ops (CUDA takes CPU scalars there),
  but not in ``torch.stack`` / ``torch.cat`` (which need every input on one device);
- ``t.to(device)``, ``t.to(other_tensor)``, ``t.cuda()`` move a host tensor to the device;
  ``t.to(dtype)``, ``t.pin_memory()`` and ops on host tensors alone stay on the host;
  ``t.cpu()`` brings a device tensor to the host. (The device is the CPU too, so ``t.to("cpu")``
  means the device here: code that fetches results to the host should say ``.cpu()``.)

It works where meta tensors and FakeTensorMode cannot: the numbers are real, so ``.item()``,
gloo collectives, DDP, FSDP2 and the megatron CPU shim run a whole step under it. Only for the
duration of a ``with StandInDevice():`` block; models built outside it are on the "device".

A test helper (no package code uses it): ct-model's tests reach it through their conftest, other
packages' tests put this directory on sys.path.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


# Where host tensors say they are: a CPU device other than the one the model's tensors report
# ("cpu"), so ``torch.arange(n, device=batch.device)`` stays on the host, as it would on a GPU machine.
HOST = torch.device("cpu", 1)


class HostTensor(torch.Tensor):
    """A tensor in host memory (under ``StandInDevice``); plain tensors are on the device."""

    # No subclass propagation of its own: StandInDevice decides what an op's outputs are.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self) -> torch.device:
        # Outside the stand-in a host tensor is a plain CPU tensor again (e.g. an optimizer's step
        # count written to a checkpoint, where torch checks for device "cpu").
        return HOST if _active else torch.Tensor.device.__get__(self)


_active = 0  # StandInDevice blocks open (host tensors report HOST only inside one)


class HostDeviceMismatch(RuntimeError):
    pass


_FACTORIES = frozenset({torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
                        torch.arange, torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm,
                        torch.eye, torch.from_numpy})
_MOVES = frozenset({torch.Tensor.to, torch.Tensor.cuda})
_COPIES = frozenset({torch.Tensor.copy_, torch.Tensor.__getitem__, torch.Tensor.__setitem__,
                     torch.Tensor.index_put_})
_SAME_DEVICE_ONLY = frozenset({torch.stack, torch.cat, torch.concat, torch.concatenate, torch.hstack,
                               torch.vstack})
# Introspection that touches no data on either device.
_METADATA = frozenset({torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.size, torch.Tensor.__len__})


def to_host(tree):
    """``tree`` (a batch dict, a list of them) with every tensor marked as host memory."""
    return tree_map(lambda x: x.as_subclass(HostTensor) if isinstance(x, torch.Tensor) else x, tree)


def is_host(x) -> bool:
    return isinstance(x, HostTensor)


def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))


def _target_is_host(func, args, kwargs) -> bool | None:
    """Where ``func`` puts its result by its device argument: True host, False device, None none given."""
    target = kwargs.get("device")
    if func in _MOVES:
        if func is torch.Tensor.cuda:
            return False
        for a in args[1:]:
            if isinstance(a, (str, torch.device)):
                target = a
            elif isinstance(a, torch.Tensor):
                target = a.device
    if target is None:
        return None
    return torch.device(target) == HOST


class StandInDevice(TorchFunctionMode):
    """See the module docstring. ``moved`` counts the host -> device moves it saw, so a test can
    tell that the batch really went through a transfer."""

    def __init__(self):
        super().__init__()
        self.moved = 0

    def __enter__(self):
        global _active
        _active += 1
        return super().__enter__()

    def __exit__(self, *exc):
        global _active
        _active -= 1
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target_host = _target_is_host(func, args, kwargs)
        if func in _FACTORIES:  # made without device=: on the host, as torch.zeros(n) on a GPU machine
            out = func(*args, **kwargs)
            return _as_host(out) if target_host is not False and not _device_data(func, args) else out
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        host = [x for x in tensors if isinstance(x, HostTensor)]
        if func is torch.Tensor.cpu:  # device -> host, unambiguously (``.to("cpu")`` reads as the device)
            return _as_host(func(*args, **kwargs))
        if func in _METADATA or not (host or target_host):
            return func(*args, **kwargs)
        if func in _MOVES and isinstance(args[0], HostTensor):
            out = func(*args, **kwargs)
            if target_host is False:
                self.moved += 1
                # A copy, as a real host -> device transfer makes (also when the dtype is the same).
                return _as_device(out.clone() if out is args[0] else out)
            return _as_host(out)
        if target_host is not None:  # zeros_like(x, device=...), x.new_zeros(..., device=...)
            out = func(*args, **kwargs)
            return _as_host(out) if target_host else _as_device(out)
        if any(not isinstance(x, HostTensor) for x in tensors):
            self._check_mix(func, host)
            return _as_device(func(*args, **kwargs))
        return _as_host(func(*args, **kwargs))

    @staticmethod
    def _check_mix(func, host) -> None:
        if func in _COPIES:
            return
        shaped = [tuple(x.shape) for x in host if x.dim() > 0]
        if shaped or func in _SAME_DEVICE_ONLY:
            raise HostDeviceMismatch(
                f"{_name(func)}: expected all tensors to be on the same device, but a tensor still on the host "
                f"(shape {shaped[0] if shaped else ()}) meets tensors on the device; move it with .to(device)")


def _device_data(func, args) -> bool:
    """torch.as_tensor(device_tensor): the data is already on the device and stays there."""
    return func is torch.as_tensor and any(isinstance(a, torch.Tensor) and not isinstance(a, HostTensor)
                                           for a in args)


def _as_host(out):
    return tree_map(lambda x: x.as_subclass(HostTensor) if type(x) is torch.Tensor else x, out)


def _as_device(out):
    return tree_map(lambda x: x.as_subclass(torch.Tensor) if isinstance(x, HostTensor) else x, out)

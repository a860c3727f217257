"""The stand-in device's rules, each against what CUDA does with a CPU tensor (ct_model.standin)."""

from __future__ import annotations

import pytest
import torch

from standin import HOST, HostDeviceMismatch, StandInDevice, is_host, to_host


def test_host_and_device_tensors_do_not_mix():
    weight = torch.randn(4, 3)  # made outside: on the device
    with StandInDevice():
        ids = to_host(torch.tensor([[0, 2]]))
        with pytest.raises(HostDeviceMismatch, match="embedding.*shape \\(1, 2\\)"):
            torch.nn.functional.embedding(ids, weight)
        with pytest.raises(HostDeviceMismatch):
            weight[:1] + to_host(torch.ones(3))


def test_factories_without_a_device_make_host_tensors():
    with StandInDevice():
        assert is_host(torch.zeros(3)) and is_host(torch.tensor([1.0])) and is_host(torch.arange(2))
        assert not is_host(torch.zeros(3, device=torch.device("cpu")))  # an explicit device: the device
        host = to_host(torch.ones(2))
        assert host.device == HOST
        assert is_host(torch.arange(2, device=host.device))  # a device taken from a host tensor: the host
        assert is_host(torch.zeros_like(host)) and is_host(host * 2) and is_host(host.to(torch.float64))
    assert to_host(torch.ones(1)).device == torch.device("cpu")  # outside, a plain CPU tensor again


def test_moves_copies_indexing_and_scalars_are_allowed_as_on_cuda():
    device_tensor = torch.arange(6.0)
    with StandInDevice() as mode:
        host = to_host(torch.ones(2))
        moved = host.to(device_tensor.device, non_blocking=True)
        assert not is_host(moved) and moved.tolist() == [1.0, 1.0]
        assert not is_host(to_host(torch.ones(1)).to(device_tensor))  # .to(other) takes its device
        assert is_host((moved * 3).cpu())
        device_tensor[:2].copy_(host)  # host -> device copy
        assert device_tensor[to_host(torch.tensor([0, 1]))].tolist() == [1.0, 1.0]  # host indices
        assert not is_host(device_tensor * to_host(torch.tensor(2.0)))  # a CPU scalar
        with pytest.raises(HostDeviceMismatch, match="stack"):  # ... but not in stack/cat
            torch.stack((device_tensor.sum(), to_host(torch.tensor(2.0))))
    assert mode.moved == 2

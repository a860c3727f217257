"""Chunked linear cross-entropy against the unchunked F.linear + F.cross_entropy reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from tensor_probe import LargestTensor

from ct_model import fused_ce
from ct_model.batch import IGNORE_INDEX
from ct_model.chunked_ce import linear_cross_entropy


def _inputs(n=300, h=48, v=211, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = (torch.randn(v, h, generator=g) * 0.2).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.3] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_equals_reference_loss_and_grads(chunk):
    hidden, weight, labels = _inputs()
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_gh, ref_gw = torch.autograd.grad(ref * 0.5, (hidden, weight))
    got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(got * 0.5, (hidden, weight))
    # Relative to the tensor's norm: chunking only reorders fp32 sums (cancellation makes a few
    # tiny entries differ more, element-wise, than 1e-6 of themselves).
    for a, b in ((got, ref), (gh, ref_gh), (gw, ref_gw)):
        assert ((a - b).norm() / b.norm()).item() <= 1e-6


def test_unchunked_path_and_bad_chunk():
    hidden, weight, labels = _inputs(n=20)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 0), ref)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(hidden, weight, labels, -1)




def test_no_tokens_by_vocab_tensor_when_chunked():
    hidden, weight, labels = _inputs(n=512, h=16, v=1024)
    with LargestTensor() as mode:
        linear_cross_entropy(hidden, weight, labels, chunk_tokens=32).backward()
    assert mode.largest <= 32 * 1024, mode.largest  # a [512, 1024] logits tensor would be 16x that
    with LargestTensor() as mode:
        linear_cross_entropy(hidden, weight, labels, chunk_tokens=0).backward()
    assert mode.largest >= 512 * 1024 * 0.6  # the check does see full logits when they exist


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)
        return func(*args, **(kwargs or {}))


def test_no_gradient_work_under_no_grad():
    hidden, weight, labels = _inputs(n=64)
    chunks = -(-int((labels != IGNORE_INDEX).sum()) // 8)
    counts = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), _CountMatmuls() as mode:
            got = linear_cross_entropy(hidden, weight, labels, chunk_tokens=8)
        counts.append(mode.count)
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
    assert counts == [3 * chunks, chunks]  # projection (+ d hidden, d W with grad) per chunk


def test_fused_kernels_only_on_cuda(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(fused_ce, "_installed", lambda name: True)  # as if both were installed
    assert fused_ce.pick_kernel(cpu, "auto") is None  # Triton kernels: CPU takes the torch path
    assert fused_ce.pick_kernel(torch.device("cuda"), "auto") == "cut_cross_entropy"
    assert fused_ce.pick_kernel(torch.device("cuda"), "off") is None
    with pytest.raises(ValueError, match="loss.fused_kernel"):
        fused_ce.pick_kernel(cpu, "liger_kernel")
    with pytest.raises(ValueError, match="loss.fused_kernel"):
        fused_ce.pick_kernel(cpu, "triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", fused_ce.KERNELS)
def test_fused_kernel_matches_the_chunked_path(kernel):
    if not fused_ce._installed(kernel):
        pytest.skip(f"{kernel} is not installed")
    hidden, weight, labels = (x.detach().cuda() for x in _inputs(n=2048, h=256, v=32000))
    results = []
    for fused in (kernel, "off"):
        h = hidden.to(torch.bfloat16).requires_grad_(True)
        w = weight.to(torch.bfloat16).requires_grad_(True)
        loss = linear_cross_entropy(h, w, labels, chunk_tokens=512, fused=fused)
        loss.backward()
        results.append((loss.float(), h.grad.float(), w.grad.float()))
    # bf16 inputs, two summation orders: agreement to bf16 precision, not fp32's
    for a, b in zip(*results):
        assert ((a - b).norm() / b.norm()).item() <= 2e-2



def _wgrad_case(device):
    g = torch.Generator().manual_seed(3)
    acc = torch.randn(96, 40, generator=g)
    grad, hidden = torch.randn(128, 96, generator=g), torch.randn(128, 40, generator=g)
    want = acc.double() + grad.double().t() @ hidden.double()
    return acc.to(device), grad.to(device), hidden.to(device), want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_gradient_accumulates_in_fp32_from_gemms_in_the_compute_dtype(dtype):
    from ct_model.matmul import accumulate_weight_grad

    acc, grad, hidden, want = _wgrad_case("cpu")
    accumulate_weight_grad(acc, grad, hidden, dtype)
    assert acc.dtype == torch.float32
    err = ((acc.double() - want).norm() / want.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err  # bf16 operands: ~3 significant digits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_weight_gradient_goes_straight_into_the_fp32_sum():
    from ct_model import matmul

    acc, grad, hidden, want = _wgrad_case("cuda")
    assert matmul._addmm_out_dtype_works(acc.device, torch.bfloat16, torch.float32)  # the fast path is taken
    matmul.accumulate_weight_grad(acc, grad, hidden, torch.bfloat16)
    assert ((acc.double().cpu() - want).norm() / want.norm()).item() < 1e-2


def _fused_case(device, dtype):
    g = torch.Generator().manual_seed(5)
    n, h, v = 512, 128, 2048
    hidden, weight = torch.randn(n, h, generator=g) * 0.5, torch.randn(v, h, generator=g) * 0.05
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    return [t.to(device, dtype).requires_grad_() for t in (hidden, weight)] + [labels.to(device)]


def _loss_and_grads(kernel, device, dtype):
    hidden, weight, labels = _fused_case(device, dtype)
    if kernel == "float64":
        loss = F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=-100, reduction="sum")
    else:
        loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=256, fused=kernel)
    loss.backward()
    return [t.detach().double().cpu() for t in (loss, hidden.grad, weight.grad)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["none", *fused_ce.KERNELS])
def test_each_cuda_backend_matches_the_float64_reference(kernel):
    """Every backend ``loss.fused_kernel`` can pick, in bf16 on CUDA, against the float64 CPU
    loss and gradients; "none" (the torch chunked path) is the control, judged the same way."""
    if kernel != "none" and not fused_ce._installed(kernel):
        pytest.skip(f"{kernel} not installed (uv sync --extra fused)")
    want = _loss_and_grads("float64", "cpu", torch.float64)
    got = _loss_and_grads(kernel, "cuda", torch.bfloat16)
    errors = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]
    assert errors[0] < 5e-3 and max(errors[1:]) < 3e-2, (kernel, errors)  # bf16 operands

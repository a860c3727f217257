"""Matmuls of the loss heads in the run's compute dtype: what autocast does for ``F.linear``, done
by hand where autocast does not reach (in-place ``addmm_``, FSDP2's bf16 parameters without
autocast), so a bf16 run has no fp32 GEMM of vocabulary size.

The weight gradient of a chunked loss head is a sum over chunks of g.T @ h ([vocab, hidden]). Each
chunk's product runs in the compute dtype with fp32 accumulation inside the GEMM, and the sum over
chunks is kept in fp32: on CUDA in one ``addmm`` writing fp32 straight into the sum (cuBLAS's
bf16-in / fp32-out GEMM, ``out_dtype``), elsewhere as a bf16 product added to the fp32 sum.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("ct_model")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x``'s matmuls run in: autocast's when it is on for ``x``'s device, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def matmul_in(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``. Under autocast the operands are left to it (it keeps one bf16 copy
    of a weight for the whole forward; an explicit cast would copy [vocab, hidden] per chunk)."""
    if torch.is_autocast_enabled(a.device.type):
        return a @ b
    return a.to(dtype) @ b.to(dtype)


def accumulate_weight_grad(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dtype: torch.dtype) -> None:
    """``acc += g.T @ h`` in place: the GEMM in ``dtype``, the sum in ``acc``'s dtype (fp32)."""
    a, b = g.t().to(dtype), h.to(dtype)
    if dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _addmm_out_dtype_works(acc.device, dtype, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        with torch.autocast(acc.device.type, enabled=False):
            acc.add_(a @ b)


@functools.cache
def _addmm_out_dtype_works(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether this torch and device accumulate a ``dtype`` GEMM into an ``out_dtype`` tensor in
    place (checked once per device against the plain computation; the fallback is always right)."""
    g = torch.Generator(device=device).manual_seed(0)
    acc = torch.randn(64, 32, device=device, generator=g, dtype=out_dtype)
    a = torch.randn(64, 48, device=device, generator=g).to(dtype)
    b = torch.randn(48, 32, device=device, generator=g).to(dtype)
    want = acc + (a.to(out_dtype) @ b.to(out_dtype))
    try:
        torch.addmm(acc, a, b, out_dtype=out_dtype, out=acc)
        ok = bool(torch.allclose(acc, want, rtol=2e-2, atol=2e-2))
    except (RuntimeError, TypeError) as err:
        log.info("addmm with out_dtype unavailable on %s (%s): bf16 products added to fp32 instead", device, err)
        return False
    if not ok:
        log.warning("addmm with out_dtype gave wrong numbers on %s: bf16 products added to fp32 instead", device)
    return ok

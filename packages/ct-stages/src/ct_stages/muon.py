"""Muon for the blocks' weight matrices and AdamW for every other parameter, in one optimizer.

Why not ``torch.optim.Muon``: it takes only 2-D parameters (MoE experts are [E, out, in]), always
runs Newton-Schulz in bf16 (CPU runs here are fp32 and exact), and orthogonalises whatever tensor
it is given (an FSDP2 shard is a slice of rows, not the matrix). One optimizer for both kinds of
parameter keeps checkpoints, resume and LR schedules exactly as for AdamW (one state dict, one
LambdaLR over all groups, each group with its own base LR).

The update of a Muon matrix W with gradient G (Keller Jordan's Muon, torch's conventions):
    B <- mu B + (1 - mu) G                      (momentum buffer, an EMA)
    U <- (1 - mu) G + mu B  if nesterov else B
    O <- NS_k(U) per matrix, x scale(shape)     (quintic Newton-Schulz, k steps)
    W <- W (1 - lr wd) - lr O
Per matrix, not per head: each nn.Linear weight (q, k, v, o, gate, up, down, MLA's projections)
is one matrix, as nanochat and modded-nanogpt do; the fused MoE ``gate_up_proj`` [E, 2I, H] is
split into its gate and up halves and every expert is its own matrix (a batched NS).

Under FSDP2 a parameter is a DTensor shard: the update is all-gathered (``full_tensor``) once per
matrix per step, orthogonalised on every rank (deterministic, so every rank gets the same
result), and each rank keeps its own shard. Each rank repeats the NS of every matrix; spreading
the matrices over the ranks is an optimisation left for later.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate

# Keller Jordan's quintic coefficients (also torch.optim.Muon's): the slope at zero is maximised, so
# singular values land in roughly [0.7, 1.2] after 5 steps instead of converging to exactly 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("match_rms_adamw", "original")


def newton_schulz(g: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonalise each matrix in the last two dims of ``g`` (batched)."""
    x = g.to(dtype)
    wide = x.size(-2) <= x.size(-1)
    if not wide:  # iterate on the smaller Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so every singular value starts in (0, 1].
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


def lr_scale(rows: int, cols: int, adjust: str) -> float:
    """match_rms_adamw (Moonshot): the update's RMS matches AdamW's (~0.2), so Muon can reuse
    AdamW's LR and weight decay. original (Keller Jordan): sqrt(max(1, rows/cols)), with its own
    LR (~0.02)."""
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def orthogonalised(update: torch.Tensor, split: int, steps: int, adjust: str,
                   dtype: torch.dtype) -> torch.Tensor:
    """The scaled NS of every matrix in ``update`` (full, not a shard); ``split`` cuts dim -2
    into that many matrices (a fused gate/up projection), each orthogonalised on its own."""
    parts = update.chunk(split, dim=-2) if split > 1 else (update,)
    out = []
    for part in parts:
        scale = lr_scale(part.size(-2), part.size(-1), adjust)
        out.append(newton_schulz(part, steps, dtype).to(update.dtype) * scale)
    return torch.cat(out, dim=-2) if split > 1 else out[0]


def _ns_dtype(param: torch.Tensor) -> torch.dtype:
    # bf16 on GPU (the matmuls dominate and NS tolerates it); fp32 elsewhere, exact on CPU runs.
    return torch.bfloat16 if param.device.type == "cuda" else torch.float32


class MuonWithAdamW(torch.optim.Optimizer):
    """Param groups with ``muon=True`` step with Muon (``split``: matrices fused along dim -2),
    the others with AdamW. Every group has its own ``lr`` and ``weight_decay``."""

    def __init__(self, groups: list[dict], *, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr: str = "match_rms_adamw"):
        defaults = dict(lr=lr, weight_decay=0.0, betas=tuple(betas), eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, adjust_lr=adjust_lr, muon=False, split=1)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                (self._muon if group["muon"] else self._adamw)(p, group)
        return loss

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, grad, mu = state["momentum_buffer"], p.grad, group["momentum"]
        buf.lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if group["nesterov"] else buf
        sharded = isinstance(update, DTensor)
        full = update.full_tensor() if sharded else update
        o = orthogonalised(full, group["split"], group["ns_steps"], group["adjust_lr"], _ns_dtype(p))
        if sharded:  # Replicate -> the parameter's placements is a local slice, no communication
            mesh = p.device_mesh
            o = DTensor.from_local(o, mesh, [Replicate()] * mesh.ndim, run_check=False)
            o = o.redistribute(mesh, p.placements)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(o, alpha=-group["lr"])

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update, written out (same order of operations)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        step, (b1, b2), grad = state["step"].item(), group["betas"], p.grad
        p.mul_(1 - group["lr"] * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bias1, bias2 = 1 - b1 ** step, 1 - b2 ** step
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias2)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / bias1)

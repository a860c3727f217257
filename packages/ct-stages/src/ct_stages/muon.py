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

Under FSDP2 a parameter is a DTensor sharded by rows (``Shard(0)`` on a 1-D mesh): NS needs the
whole matrix, so the matrices are spread over the ranks. They are taken in parameter order (the
same on every rank) in rounds of ``world_size``; in a round the i-th matrix belongs to rank i,
which receives every rank's rows of its update (``gather``), orthogonalises it, and sends each rank
its rows of the result back (``scatter``). Each matrix is orthogonalised once, by one rank, and a
rank holds at most one full matrix per round (plain c10d collectives on the mesh's process group,
so gloo runs it on CPU; NCCL has gather and scatter too). Round robin, not size-balanced: a
round lasts as long as its largest matrix, and consecutive parameters of a block differ little. The
arithmetic is the single-process one on the same full matrix, so results are bit-identical to
gathering everywhere. Other layouts (a 2-D mesh, another placement) fall back to ``full_tensor``
on every rank. DDP and single processes see plain tensors: every rank repeats every NS (DDP's
ranks hold the same all-reduced gradient, so they agree).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

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


def _ns(full: torch.Tensor, group: dict) -> torch.Tensor:
    return orthogonalised(full, group["split"], group["ns_steps"], group["adjust_lr"], _ns_dtype(full))


def _row_sharded(t: torch.Tensor) -> bool:
    """FSDP2's layout: a DTensor sharded by rows over a 1-D mesh (the one ``_spread_ns`` handles)."""
    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def _rows(n: int, world: int) -> list[int]:
    """Rows of each rank's shard of ``n`` rows: ``torch.chunk``'s split, which ``Shard(0)`` uses
    (ceil(n / world) each, the last ones short or empty)."""
    per = -(-n // world)
    return [max(0, min(per, n - r * per)) for r in range(world)]


def _padded(local: torch.Tensor, rows: int) -> torch.Tensor:
    """``local`` with zero rows appended up to ``rows``: shards can be uneven, and gather and
    scatter exchange tensors of one size."""
    out = local.new_zeros((rows, *local.shape[1:]))
    out[: local.size(0)] = local
    return out


def _spread_ns(items: list[tuple]) -> list[tuple]:
    """``(p, group, update)`` row-sharded DTensors -> ``(p, group, o)`` with ``o`` this rank's
    rows of the orthogonalised update, each matrix orthogonalised by one rank (module docstring).
    Every rank passes them in one order; each mesh's matrices are spread over that mesh (ct's
    FSDP2 has one, the data-parallel mesh)."""
    by_mesh: dict = {}
    for item in items:
        by_mesh.setdefault(item[2].device_mesh, []).append(item)
    out = []
    for mesh, group in by_mesh.items():
        pg, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        for start in range(0, len(group), world):
            out += _spread_round(group[start:start + world], pg, world, rank)
    return out


def _spread_round(items: list[tuple], pg, world: int, rank: int) -> list[tuple]:
    """One round: item i belongs to rank i. All gathers are issued before the owner computes
    (async), so no rank waits on another's NS to contribute its rows."""
    pads = [-(-u.size(0) // world) for _, _, u in items]
    works, mine = [], None
    for owner, ((_, group, update), pad) in enumerate(zip(items, pads)):
        local = _padded(update.to_local(), pad)
        bucket = [torch.empty_like(local) for _ in range(world)] if owner == rank else None
        works.append(dist.gather(local, bucket, group=pg, group_dst=owner, async_op=True))
        if owner == rank:
            mine = (bucket, update.size(0), group)
    for work in works:
        work.wait()
    pieces = None
    if mine is not None:  # cut the padding off each rank's rows, orthogonalise, cut again
        bucket, n, group = mine
        full = torch.cat([b[:rows] for b, rows in zip(bucket, _rows(n, world))])
        pieces = [_padded(part, bucket[0].size(0)) for part in _split_rows(_ns(full, group), world)]
    return _scatter_round(items, pads, pieces, pg, world, rank)


def _split_rows(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    rows = _rows(full.size(0), world)
    return list(full.split(rows))


def _scatter_round(items, pads, pieces, pg, world: int, rank: int) -> list[tuple]:
    """Each owner sends every rank its rows of the result; wrapped back into the parameter's
    DTensor layout (the local tensor is exactly that rank's shard)."""
    works, received = [], []
    for owner, ((_, _, update), pad) in enumerate(zip(items, pads)):
        local = update.to_local()
        recv = local.new_empty((pad, *local.shape[1:]))
        works.append(dist.scatter(recv, pieces if owner == rank else None, group=pg, group_src=owner,
                                  async_op=True))
        received.append(recv)
    for work in works:
        work.wait()
    out = []
    for (p, group, update), recv in zip(items, received):
        local = recv[: update.to_local().size(0)]
        o = DTensor.from_local(local, update.device_mesh, update.placements, run_check=False,
                               shape=update.shape, stride=update.stride())
        out.append((p, group, o))
    return out


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
        spread = []  # row-sharded Muon matrices: orthogonalised after the loop, one owner each
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not group["muon"]:
                    self._adamw(p, group)
                    continue
                update = self._momentum(p, group)
                if _row_sharded(update):
                    spread.append((p, group, update))
                else:
                    self._apply(p, group, self._full_ns(update, group))
        for p, group, o in _spread_ns(spread):
            self._apply(p, group, o)
        return loss

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """The update to orthogonalise (elementwise, so a shard's is the shard of the full one)."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf, grad, mu = state["momentum_buffer"], p.grad, group["momentum"]
        buf.lerp_(grad, 1 - mu)
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    @staticmethod
    def _full_ns(update: torch.Tensor, group: dict) -> torch.Tensor:
        """A plain tensor, or the fallback for a DTensor layout that is not spread: every rank
        gathers the whole matrix and orthogonalises it."""
        sharded = isinstance(update, DTensor)
        full = update.full_tensor() if sharded else update
        o = _ns(full, group)
        if sharded:  # Replicate -> the parameter's placements is a local slice, no communication
            mesh = update.device_mesh
            o = DTensor.from_local(o, mesh, [Replicate()] * mesh.ndim, run_check=False)
            o = o.redistribute(mesh, update.placements)
        return o

    @staticmethod
    def _apply(p: torch.Tensor, group: dict, o: torch.Tensor) -> None:
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

"""Influence of training samples on probe sets for one model, streamed batch by batch.

score(x; probe c) = v_c^T H^-1 g_x summed over the two layers (embedding role, output role), where
v_c is the mean probe gradient and H^-1 is DataInf's closed form built from the gradients of the
scored samples themselves (see ``ct_datamix.datainf``). Sign: positive = a gradient step on x
lowers the probe loss (helpful). This is minus Koh & Liang's "loss change when up-weighting x",
i.e. the paper's I(x, z) = -grad L(z)^T H^-1 grad L(x) read as a loss *decrease*.

Per-sample gradient factors are kept between passes up to a memory budget and recomputed beyond
it, so memory is bounded by the budget plus one batch of factors plus, per domain and layer, two
[V, h] matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .datainf import DAMPING_SCALE
from .grads import ROLES, per_sample_grads


def _batches(samples: list[torch.Tensor], batch_size: int) -> Iterator[tuple[int, list[torch.Tensor]]]:
    # Sorted by length so padding is small; positions are reported back in the caller's order.
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        yield idx, [samples[i] for i in idx]


def _zeros(model) -> torch.Tensor:
    return torch.zeros_like(model.output_weight, dtype=torch.float32)


@torch.no_grad()
def influence_scores(model, train: list[torch.Tensor], probes: dict[str, list[torch.Tensor]], *,
                     batch_size: int = 8, pad_id: int = 0, damping_scale: float = DAMPING_SCALE,
                     cache_mib: float = 2048, tick: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """{domain: scores [len(train)]} of every training sample against each probe set's mean gradient.

    The factored gradients of pass 2 are kept for passes 3 and 4 while they fit in ``cache_mib``;
    batches beyond it are recomputed (same numbers: the model is in eval mode, no dropout).
    """
    model.eval()
    tick = tick or (lambda n: None)
    n, dim = len(train), model.output_weight.numel()
    domains = list(probes)
    # 1. Mean probe gradient per domain and layer.
    v = {c: {r: _zeros(model) for r in ROLES} for c in domains}
    for c in domains:
        coef = torch.full((batch_size,), 1.0 / len(probes[c]), device=model.output_weight.device)
        for _, batch in _batches(probes[c], batch_size):
            grads, _ = per_sample_grads(model, batch, pad_id)
            for r in ROLES:
                grads[r].accumulate(v[c][r], coef[: len(batch)])
    # 2. Squared norms and dots with the probe gradients (-> damping and Sherman-Morrison weights).
    sq = {r: torch.zeros(n) for r in ROLES}
    vdot = {c: {r: torch.zeros(n) for r in ROLES} for c in domains}
    cache: dict[int, dict] = {}
    budget = cache_mib * 2**20

    def grads_of(b: int, batch: list[torch.Tensor]) -> dict:
        nonlocal budget
        if b in cache:
            return cache[b]
        grads, _ = per_sample_grads(model, batch, pad_id)
        size = sum(t.numel() * t.element_size() for g in grads.values() for t in vars(g).values()
                   if isinstance(t, torch.Tensor))
        if size <= budget:
            cache[b], budget = grads, budget - size
        return grads

    for b, (idx, batch) in enumerate(_batches(train, batch_size)):
        grads = grads_of(b, batch)
        for r in ROLES:
            sq[r][idx] = grads[r].sqnorm().cpu()
            for c in domains:
                vdot[c][r][idx] = grads[r].dot(v[c][r]).cpu()
        tick(len(batch))
    lam = {r: damping_scale * float(sq[r].mean()) / dim for r in ROLES}
    # 3. w = sum_i c_i g_i with c_i = (g_i . v) / (lambda + |g_i|^2).
    w = {c: {r: _zeros(model) for r in ROLES} for c in domains}
    for b, (idx, batch) in enumerate(_batches(train, batch_size)):
        grads = grads_of(b, batch)
        for r in ROLES:
            for c in domains:
                coef = (vdot[c][r][idx] / (lam[r] + sq[r][idx])).to(v[c][r].device)
                grads[r].accumulate(w[c][r], coef)
        tick(len(batch))
    # 4. score(x) = sum_l (v . g_x - (1/n) w . g_x) / lambda_l.
    scores = {c: sum(vdot[c][r] / lam[r] for r in ROLES) for c in domains}
    for b, (idx, batch) in enumerate(_batches(train, batch_size)):
        grads = grads_of(b, batch)
        for r in ROLES:
            for c in domains:
                scores[c][idx] -= grads[r].dot(w[c][r]).cpu() / (n * lam[r])
        tick(len(batch))
    return scores

"""Joint influence over checkpoints and domains, and per-source rho."""

from __future__ import annotations

import torch


def alphas(domains: list[str], num_checkpoints: int) -> dict[tuple[str, int], float]:
    """alpha_{c,t} ~ t (t = 1..T, later checkpoints count more), uniform over domains; sums to 1."""
    total = num_checkpoints * (num_checkpoints + 1) / 2
    return {(c, t): (t + 1) / total / len(domains) for c in domains for t in range(num_checkpoints)}


def joint_influence(scores: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """I_joint [n] and its per-domain parts from per-checkpoint {domain: scores [n]} (in training order)."""
    domains = list(scores[0])
    a = alphas(domains, len(scores))
    parts = {c: sum(a[c, t] * s[c].double() for t, s in enumerate(scores)) for c in domains}
    return sum(parts.values()), parts


def rho(values: torch.Tensor, lengths: torch.Tensor, groups: list[str]) -> dict[str, float]:
    """rho_g = (1/N_g) sum_{x in g} I(x) * len(x), in first-seen order of the groups."""
    out: dict[str, float] = {}
    for g in dict.fromkeys(groups):
        mask = torch.tensor([x == g for x in groups])
        out[g] = float((values[mask] * lengths[mask].double()).mean())
    return out

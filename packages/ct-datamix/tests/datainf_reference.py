"""DataInf on dense [n, d] gradients (small dimensions): the closed form, the exact damped
empirical-Fisher solve it approximates, and the operator-norm bound between them (the formula is
in ct_datamix.datainf). The references the streamed scorer in ct_datamix.influence is tested against."""

from __future__ import annotations

import torch


def datainf_ihvp(train_grads: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """The closed-form H^-1 v for dense gradients [n, d] and a vector [d]."""
    sq = (train_grads * train_grads).sum(1)
    c = (train_grads @ v) / (lam + sq)
    return (v - (c[:, None] * train_grads).mean(0)) / lam


def explicit_ihvp(train_grads: torch.Tensor, v: torch.Tensor, lam: float) -> torch.Tensor:
    """The exact (1/n sum g g^T + lambda I)^-1 v, by a dense solve (the reference)."""
    n, d = train_grads.shape
    H = train_grads.T @ train_grads / n + lam * torch.eye(d, dtype=train_grads.dtype)
    return torch.linalg.solve(H, v)


def closed_form_error_bound(train_grads: torch.Tensor, lam: float) -> float:
    """Operator-norm bound on (explicit - closed form): both spectra lie in [1/(lam+M), 1/lam]."""
    M = float((train_grads * train_grads).sum(1).max())
    return 1.0 / lam - 1.0 / (lam + M)

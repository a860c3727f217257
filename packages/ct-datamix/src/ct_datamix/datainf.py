"""DataInf's closed-form inverse-Hessian-vector product, per layer (Kwon et al. 2024).

Per layer l with n training gradients g_i (dimension d_l) and damping lambda_l, the damped
Gauss-Newton (empirical Fisher) Hessian  H_l = (1/n) sum_i g_i g_i^T + lambda_l I  is replaced by the
mean of the per-sample inverses, each of which is a rank-one Sherman-Morrison update:

    H_l^-1 v  ~=  (1/n) sum_i (g_i g_i^T + lambda_l I)^-1 v
             =  (1/lambda_l) (v - (1/n) sum_i c_i g_i),   c_i = (g_i . v) / (lambda_l + |g_i|^2)

with lambda_l = 0.1 x mean_i |g_i|^2 / d_l (the paper's choice). Both matrices have their spectrum
in [1/(lambda + max|g|^2), 1/lambda], so the error of the closed form is at most
1/lambda - 1/(lambda + max|g|^2) in operator norm (checked in the tests).

The functions here take dense [n, d] gradients (small dimensions, tests); ``ct_datamix.influence``
applies the same formula to factored gradients streamed batch by batch.
"""

from __future__ import annotations

import torch

DAMPING_SCALE = 0.1


def damping(sqnorms: torch.Tensor, dim: int, scale: float = DAMPING_SCALE) -> float:
    """lambda_l = scale x mean squared gradient norm / d_l."""
    return float(scale * sqnorms.mean() / dim)


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

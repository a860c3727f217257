"""DataInf's closed-form inverse-Hessian-vector product, per layer (Kwon et al. 2024).

Per layer l with n training gradients g_i (dimension d_l) and damping lambda_l, the damped
Gauss-Newton (empirical Fisher) Hessian  H_l = (1/n) sum_i g_i g_i^T + lambda_l I  is replaced by the
mean of the per-sample inverses, each of which is a rank-one Sherman-Morrison update:

    H_l^-1 v  ~=  (1/n) sum_i (g_i g_i^T + lambda_l I)^-1 v
             =  (1/lambda_l) (v - (1/n) sum_i c_i g_i),   c_i = (g_i . v) / (lambda_l + |g_i|^2)

with lambda_l = 0.1 x mean_i |g_i|^2 / d_l (the paper's choice). Both matrices have their spectrum
in [1/(lambda + max|g|^2), 1/lambda], so the error of the closed form is at most
1/lambda - 1/(lambda + max|g|^2) in operator norm (checked in the tests).

``ct_datamix.influence`` applies the formula to factored gradients streamed batch by batch; its
dense form on [n, d] gradients, the exact solve it approximates and the bound are the tests'
references (packages/ct-datamix/tests/datainf_reference.py).
"""

from __future__ import annotations

import torch

DAMPING_SCALE = 0.1


def damping(sqnorms: torch.Tensor, dim: int, scale: float = DAMPING_SCALE) -> float:
    """lambda_l = scale x mean squared gradient norm / d_l."""
    return float(scale * sqnorms.mean() / dim)

"""DataInf's closed form against an explicit damped empirical-Fisher inverse (float64), and the
streamed scorer against the same formula on dense gradients of a tiny model."""

from __future__ import annotations

import pytest
import torch

from ct_datamix.datainf import damping
from ct_datamix.grads import per_sample_grads
from ct_datamix.influence import influence_scores

from datainf_reference import closed_form_error_bound, datainf_ihvp, explicit_ihvp
from datamix_helpers import samples, tiny


def test_closed_form_is_exact_for_one_sample():
    g = torch.randn(1, 6, dtype=torch.float64)
    v = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(datainf_ihvp(g, v, 0.3), explicit_ihvp(g, v, 0.3))


def test_closed_form_error_within_stated_bound_and_shrinks_with_damping():
    gen = torch.Generator().manual_seed(0)
    n, d = 20, 12
    G = torch.randn(n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    lam = damping((G * G).sum(1), d)  # the paper's lambda: 0.1 x mean |g|^2 / d
    err = (datainf_ihvp(G, v, lam) - explicit_ihvp(G, v, lam)).norm()
    bound = closed_form_error_bound(G, lam)
    assert err <= bound * v.norm()
    # Relative error falls as the damping grows (the closed form is exact as lambda -> infinity).
    rel = []
    for scale in (1.0, 10.0, 100.0, 1000.0):
        lam_s = lam * scale
        exact = explicit_ihvp(G, v, lam_s)
        rel.append(float((datainf_ihvp(G, v, lam_s) - exact).norm() / exact.norm()))
    assert rel == sorted(rel, reverse=True) and rel[-1] < 0.05 * rel[0]


@pytest.mark.parametrize("cache_mib", [0, 2048])  # recomputed / kept between passes
def test_streamed_scores_match_dense_datainf(cache_mib):
    model = tiny(True)
    train = samples(4) + [s.flip(0) for s in samples(3)]
    probes = {"a": samples(2), "b": [s[:4] for s in samples(3)]}
    got = influence_scores(model, train, probes, batch_size=3, cache_mib=cache_mib)
    g_train, _ = per_sample_grads(model, train)
    dense = {r: g.dense().reshape(len(train), -1).double() for r, g in g_train.items()}
    for c, probe in probes.items():
        g_probe, _ = per_sample_grads(model, probe)
        want = torch.zeros(len(train), dtype=torch.float64)
        for r in dense:
            v = g_probe[r].dense().reshape(len(probe), -1).double().mean(0)
            lam = damping((dense[r] ** 2).sum(1), dense[r].shape[1])
            want += dense[r] @ datainf_ihvp(dense[r], v, lam)
        torch.testing.assert_close(got[c].double(), want, rtol=2e-3, atol=1e-6 * float(want.abs().max()))

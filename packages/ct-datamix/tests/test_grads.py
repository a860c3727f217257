"""Per-sample factored gradients against a loop of single-sample backward passes."""

from __future__ import annotations

import pytest
import torch

from ct_datamix.grads import pad_batch, per_sample_grads, sample_losses
from datamix_helpers import samples, tiny


def loop_reference(model, batch):
    """Each sample alone: backward of its mean loss, read the embedding / output weight gradients."""
    out = []
    for s in batch:
        model.zero_grad()
        ids, labels = pad_batch([s])
        sample_losses(model(ids), labels).sum().backward()
        emb = model.embed_tokens.weight.grad.clone()
        lm = None if model.lm_head is None else model.lm_head.weight.grad.clone()
        out.append((emb, lm))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_factored_grads_match_single_sample_backward(tied):
    model = tiny(tied)
    batch = samples()
    grads, _ = per_sample_grads(model, batch)
    emb = grads["embedding"].dense().double()
    out = grads["output"].dense().double()
    for b, (ref_emb, ref_lm) in enumerate(loop_reference(model, batch)):
        if tied:  # the shared matrix receives both roles
            torch.testing.assert_close(emb[b] + out[b], ref_emb, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(emb[b], ref_emb, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(out[b], ref_lm, rtol=1e-4, atol=1e-6)


def test_factored_norms_dots_and_sums_match_dense():
    model = tiny(True)
    grads, _ = per_sample_grads(model, samples())
    M = torch.randn_like(model.output_weight, dtype=torch.float32)
    coef = torch.tensor([0.5, -1.0, 2.0, 0.25])
    for role, g in grads.items():
        dense = g.dense()
        torch.testing.assert_close(g.sqnorm(), (dense ** 2).sum((1, 2)), rtol=1e-4, atol=1e-7, msg=role)
        torch.testing.assert_close(g.dot(M), (dense * M).sum((1, 2)), rtol=1e-4, atol=1e-6, msg=role)
        acc = torch.zeros_like(M)
        g.accumulate(acc, coef)
        torch.testing.assert_close(acc, (coef[:, None, None] * dense).sum(0), rtol=1e-4, atol=1e-6, msg=role)

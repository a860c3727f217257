"""kd_loss against float64 references written out by hand (plain Python math, no shared code)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ct_distill import TopK, VocabMismatchError, kd_loss, kd_loss_sum

IGNORE = -100


def _softmax(xs):
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    z = sum(exps)
    return [e / z for e in exps]


def reference(student, teacher, labels=None, kind="forward_kl", T=1.0, top_k=None, beta=0.5,
              ce_weight=0.0, cached=None):
    """Mean over scored positions of T^2 * D(p, q) + ce_weight * CE, one position at a time.

    teacher: nested list [N][V] of logits, or None with cached = (ids [N][k], logprobs [N][k]).
    """
    total, n = 0.0, 0
    for i, s_row in enumerate(student):
        if labels is not None and labels[i] == IGNORE:
            continue
        V = len(s_row)
        q = _softmax([x / T for x in s_row])
        if cached is not None:
            K = list(cached[0][i])[: top_k or len(cached[0][i])]
            pk = _softmax([lp / T for lp in cached[1][i][: len(K)]])
        elif top_k is not None:
            K = sorted(range(V), key=lambda j: -teacher[i][j])[:top_k]
            pk = _softmax([teacher[i][j] / T for j in K])
        else:
            K = list(range(V))
            pk = _softmax([x / T for x in teacher[i]])
        p = [0.0] * V
        for j, pj in zip(K, pk):
            p[j] = pj
        if kind == "forward_kl":
            d = sum(p[j] * math.log(p[j] / q[j]) for j in range(V) if p[j] > 0)
        elif kind == "reverse_kl":
            mass = sum(q[j] for j in K)  # student renormalised over the teacher's support
            d = sum((q[j] / mass) * math.log((q[j] / mass) / p[j]) for j in K)
        else:
            m = [beta * p[j] + (1 - beta) * q[j] for j in range(V)]
            d = beta * sum(p[j] * math.log(p[j] / m[j]) for j in range(V) if p[j] > 0)
            d += (1 - beta) * sum(q[j] * math.log(q[j] / m[j]) for j in range(V) if q[j] > 0)
        d *= T * T
        if ce_weight:
            d += ce_weight * -math.log(_softmax(list(s_row))[labels[i]])
        total += d
        n += 1
    return total / max(n, 1)


def _data(n=7, V=11, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
    t = torch.randn(n, V, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, V, (n,), generator=g)
    labels[1] = IGNORE
    labels[-2] = IGNORE
    return s, t, labels


KINDS = ["forward_kl", "reverse_kl", "jsd"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [None, 1, 4])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("ce_weight", [0.0, 0.7])
@pytest.mark.parametrize("fused", [True, False])
def test_matches_hand_reference(kind, top_k, T, ce_weight, fused):
    s, t, labels = _data()
    got = kd_loss(s, t, labels, kind=kind, temperature=T, top_k=top_k, beta=0.3, ce_weight=ce_weight,
                  fused=fused)
    want = reference(s.tolist(), t.tolist(), labels.tolist(), kind, T, top_k, 0.3, ce_weight)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_without_labels_every_position_counts(kind):
    s, t, _ = _data(n=5)
    got = kd_loss(s.view(1, 5, -1), t.view(1, 5, -1), kind=kind, temperature=1.5)
    assert got.item() == pytest.approx(reference(s.tolist(), t.tolist(), None, kind, 1.5), rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("fused", [True, False])
def test_topk_equal_to_vocab_is_the_full_loss(kind, T, fused):
    s, t, labels = _data(V=13, seed=3)
    full = kd_loss(s, t, labels, kind=kind, temperature=T, fused=fused)
    truncated = kd_loss(s, t, labels, kind=kind, temperature=T, top_k=13, fused=fused)
    assert truncated.item() == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    gs = s.clone().requires_grad_()
    gt = s.clone().requires_grad_()
    kd_loss(gs, t, labels, kind=kind, temperature=T, fused=fused, ce_weight=0.2).backward()
    kd_loss(gt, t, labels, kind=kind, temperature=T, top_k=13, fused=fused, ce_weight=0.2).backward()
    torch.testing.assert_close(gs.grad, gt.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_topk_matches_reference_and_online_truncation(kind):
    s, t, labels = _data(V=17, seed=5)
    k = 6
    vals, ids = torch.topk(t, k)
    logprobs = vals - torch.logsumexp(t, -1, keepdim=True)  # T=1 log-softmax over the full vocab
    cached = TopK(ids, logprobs)
    got = kd_loss(s, cached, labels, kind=kind, temperature=2.0)
    want = reference(s.tolist(), None, labels.tolist(), kind, 2.0, cached=(ids.tolist(), logprobs.tolist()))
    assert got.item() == pytest.approx(want, rel=1e-10)
    online = kd_loss(s, t, labels, kind=kind, temperature=2.0, top_k=k)
    assert got.item() == pytest.approx(online.item(), rel=1e-10)
    # truncating a cached top-6 further to top-3 equals truncating the full logits to top-3
    fewer = kd_loss(s, cached, labels, kind=kind, temperature=2.0, top_k=3)
    assert fewer.item() == pytest.approx(kd_loss(s, t, labels, kind=kind, temperature=2.0, top_k=3).item(), rel=1e-10)


def test_temperature_squared_scaling_against_torch_kl_div():
    s, t, _ = _data(n=9, V=10, seed=7)
    for T in (0.5, 1.0, 4.0):
        log_q, log_p = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p || q)
        assert kd_loss(s, t, temperature=T).item() == pytest.approx(T * T * kl.item(), rel=1e-10)
        rev = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")  # KL(q || p)
        assert kd_loss(s, t, kind="reverse_kl", temperature=T).item() == pytest.approx(T * T * rev.item(), rel=1e-10)


def test_ignore_index_masks_values_and_gradients():
    s, t, labels = _data()
    s = s.clone().requires_grad_()
    loss = kd_loss(s, t, labels, ce_weight=0.5)
    loss.backward()
    assert torch.all(s.grad[labels == IGNORE] == 0)
    assert torch.all(s.grad[labels != IGNORE].abs().sum(-1) > 0)
    # garbage at ignored positions does not leak in
    s2 = s.detach().clone()
    s2[labels == IGNORE] = 1e4
    assert kd_loss(s2, t, labels, ce_weight=0.5).item() == pytest.approx(loss.item(), rel=1e-12)
    # custom ignore index
    other = torch.where(labels == IGNORE, torch.full_like(labels, -1), labels)
    assert kd_loss(s.detach(), t, other, ignore_index=-1, ce_weight=0.5).item() == pytest.approx(loss.item(), rel=1e-12)


def test_all_ignored_is_zero_not_nan():
    s, t, labels = _data()
    labels[:] = IGNORE
    total, count = kd_loss_sum(s, t, labels)
    assert count.item() == 0 and total.item() == 0.0
    assert kd_loss(s, t, labels).item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_sum_form_adds_up_across_microbatches(kind):
    s, t, labels = _data(n=12, seed=11)
    labels[7] = IGNORE
    parts = [kd_loss_sum(s[a:b], t[a:b], labels[a:b], kind=kind, ce_weight=0.2) for a, b in ((0, 5), (5, 12))]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert total.item() == pytest.approx(kd_loss(s, t, labels, kind=kind, ce_weight=0.2).item(), rel=1e-12)
    assert sum(int(p[1]) for p in parts) == int((labels != IGNORE).sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("fused", [True, False])
def test_gradcheck(kind, top_k, fused):
    s, t, labels = _data(n=4, V=6, seed=13)
    s = s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: kd_loss(x, t, labels, kind=kind, temperature=1.7, top_k=top_k, beta=0.4, ce_weight=0.3,
                          fused=fused),
        (s,))


@pytest.mark.parametrize("kind", KINDS)
def test_fused_and_autograd_gradients_agree(kind):
    s, t, labels = _data(n=20, V=30, seed=21)
    for top_k in (None, 7):
        a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
        la = kd_loss(a, t, labels, kind=kind, temperature=1.3, top_k=top_k, ce_weight=0.4, fused=True)
        lb = kd_loss(b, t, labels, kind=kind, temperature=1.3, top_k=top_k, ce_weight=0.4, fused=False)
        (3 * la).backward()
        (3 * lb).backward()
        assert la.item() == pytest.approx(lb.item(), rel=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_fused_does_not_modify_logits_and_allows_retain_graph():
    s, t, labels = _data()
    x = s.clone().requires_grad_()
    y = x * 1.0  # non-leaf, like a model's logits
    before = y.detach().clone()
    loss = kd_loss(y, t, labels, ce_weight=0.5)
    assert torch.equal(y, before)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(x.grad, 3 * first)


def test_gradcheck_cached_teacher():
    s, t, _ = _data(n=4, V=8, seed=17)
    vals, ids = torch.topk(t, 3)
    cached = TopK(ids, vals - torch.logsumexp(t, -1, keepdim=True))
    s = s.requires_grad_()
    for kind in KINDS:
        for fused in (True, False):
            assert torch.autograd.gradcheck(
                lambda x: kd_loss(x, cached, kind=kind, temperature=2.0, fused=fused), (s,))


def test_identical_distributions_give_zero():
    s, _, _ = _data()
    for kind in KINDS:
        assert kd_loss(s, s.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("fused", [True, False])
def test_float32_stable_on_large_logits(fused):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 50, generator=g) * 200).requires_grad_()
    t = torch.randn(3, 50, generator=g) * 200
    t[0, :10] = float("-inf")  # masked teacher entries
    for kind in ("forward_kl", "jsd"):
        for top_k in (None, 5):
            loss = kd_loss(s, t, kind=kind, top_k=top_k, fused=fused)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
            s.grad = None


def test_bf16_logits_are_computed_in_float32():
    s, t, labels = _data()
    got = kd_loss(s.bfloat16(), t.bfloat16(), labels)
    assert got.dtype == torch.float32
    want = kd_loss(s.bfloat16().double(), t.bfloat16().double(), labels)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_errors_are_clear():
    s, t, labels = _data(V=11)
    with pytest.raises(VocabMismatchError, match="teacher vocabulary size 12 != student vocabulary size 11"):
        kd_loss(s, torch.zeros(s.shape[0], 12, dtype=s.dtype))
    with pytest.raises(ValueError, match="kind"):
        kd_loss(s, t, kind="kl")
    with pytest.raises(ValueError, match="beta"):
        kd_loss(s, t, kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, temperature=0)
    with pytest.raises(ValueError, match="needs labels"):
        kd_loss(s, t, ce_weight=1.0)
    with pytest.raises(ValueError, match="top_k=12 exceeds"):
        kd_loss(s, t, top_k=12)
    with pytest.raises(ValueError, match="labels shape"):
        kd_loss(s, t, labels[:3])
    ids = torch.zeros(s.shape[0], 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the cached teacher's k=4"):
        kd_loss(s, TopK(ids, torch.zeros(ids.shape, dtype=s.dtype)), top_k=5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_form", ["logits", "topk", "cached"])
def test_the_vocab_shard_loss_on_one_shard_equals_kd_loss_sum(kind, teacher_form):
    """One shard holding the whole vocabulary (reductions are the identity): the split-logits
    formulas equal kd_loss_sum; tests/test_vocab_parallel_kd.py splits over 2 real processes."""
    from ct_distill import kd_loss_sum_on_shards
    from ct_model.batch import VocabShard

    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 16, (3, 4), generator=g)
    labels[0, 0] = -100
    top_k = 4 if teacher_form == "topk" else None
    if teacher_form == "cached":
        values, ids = torch.topk(torch.log_softmax(teacher, -1), 4, dim=-1)
        teacher = TopK(ids, values)
    options = dict(kind=kind, temperature=1.5, top_k=top_k, ce_weight=0.25, beta=0.4)
    whole = VocabShard(0, 16, sum=lambda x: x, use_locally=lambda x: x, max=lambda x: x)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    want, _ = kd_loss_sum(a, teacher, labels, **options)
    got = kd_loss_sum_on_shards(b, teacher, labels, whole, **options)
    want.backward()
    got.backward()
    assert torch.allclose(got, want, rtol=1e-12, atol=0) and torch.allclose(b.grad, a.grad, rtol=1e-9, atol=1e-12)

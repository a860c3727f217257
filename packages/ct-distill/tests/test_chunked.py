"""Chunked KD from hidden states equals kd_loss on the full logits (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from ct_distill import (StudentHidden, TeacherHidden, TopK, VocabMismatchError, chunked_kd_loss,
                        chunked_kd_loss_sum, kd_loss, kd_loss_sum, DistillationLoss)

IGNORE = -100
KINDS = ["forward_kl", "reverse_kl", "jsd"]


def _setup(B=2, T=9, H=8, V=23, Ht=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.7
    t_hidden = torch.randn(B, T, Ht, generator=g, dtype=dtype)
    t_weight = torch.randn(V, Ht, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 2] = labels[-1, 0] = labels[-1, 4] = IGNORE
    return hidden, weight, TeacherHidden(t_hidden, t_weight), labels


def _teacher_forms(teacher_hidden, k):
    logits = F.linear(teacher_hidden.hidden, teacher_hidden.output_weight)
    vals, ids = torch.topk(logits, k)
    cached = TopK(ids, vals - torch.logsumexp(logits, -1, keepdim=True))
    return {"logits": logits, "topk": cached, "hidden": teacher_hidden}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("form", ["logits", "topk", "hidden"])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_chunked_equals_full_values_and_grads(kind, form, chunk_size):
    hidden, weight, teacher_hidden, labels = _setup()
    teacher = _teacher_forms(teacher_hidden, k=7)[form]
    top_k = 5 if form != "topk" else None
    opts = dict(kind=kind, temperature=1.8, top_k=top_k, beta=0.35, ce_weight=0.4)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    full_teacher = F.linear(teacher.hidden, teacher.output_weight) if form == "hidden" else teacher
    want, want_n = kd_loss_sum(F.linear(h1, w1), full_teacher, labels, fused=False, **opts)
    want.backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got, got_n = chunked_kd_loss_sum(h2, w2, teacher, labels, chunk_size=chunk_size, **opts)
    (got * 2.5).backward()  # the incoming gradient scales the stored one

    assert int(got_n) == int(want_n) == int((labels != IGNORE).sum())
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(h2.grad, 2.5 * h1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w2.grad, 2.5 * w1.grad, rtol=1e-10, atol=1e-12)


def test_chunked_mean_form_and_no_labels():
    hidden, weight, teacher_hidden, _ = _setup()
    logits_t = F.linear(teacher_hidden.hidden, teacher_hidden.output_weight)
    got = chunked_kd_loss(hidden, weight, logits_t, kind="jsd", chunk_size=5)
    want = kd_loss(F.linear(hidden, weight), logits_t, kind="jsd")
    assert got.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_gradcheck(kind):
    hidden, weight, teacher_hidden, labels = _setup(B=1, T=5, H=4, V=7, Ht=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_kd_loss(h, w, teacher_hidden, labels, kind=kind, temperature=1.5,
                                     top_k=4, ce_weight=0.5, chunk_size=2, retain_grads=True),
        (hidden, weight))


def test_second_backward_needs_retain_grads():
    hidden, weight, teacher_hidden, labels = _setup()
    h = hidden.clone().requires_grad_()
    loss = chunked_kd_loss(h, weight, teacher_hidden, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_grads=True"):
        loss.backward()
    h2 = hidden.clone().requires_grad_()
    again = chunked_kd_loss(h2, weight, teacher_hidden, labels, retain_grads=True)
    again.backward(retain_graph=True)
    again.backward()
    torch.testing.assert_close(h2.grad, 2 * h.grad)


def test_chunked_frozen_weight_and_no_grad():
    hidden, weight, teacher_hidden, labels = _setup()
    h = hidden.clone().requires_grad_()
    loss = chunked_kd_loss(h, weight, teacher_hidden, labels, chunk_size=3)
    loss.backward()
    assert h.grad is not None and weight.grad is None
    with torch.no_grad():
        again = chunked_kd_loss(hidden, weight, teacher_hidden, labels, chunk_size=3)
    assert again.item() == pytest.approx(loss.item(), rel=1e-12)


def test_chunked_float32_and_bf16_close_to_full():
    hidden, weight, teacher_hidden, labels = _setup(dtype=torch.float32, V=300, T=40)
    logits_t = F.linear(teacher_hidden.hidden, teacher_hidden.output_weight)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        h = hidden.to(dtype).detach().requires_grad_()
        w = weight.to(dtype).detach().requires_grad_()
        got = chunked_kd_loss(h, w, logits_t, labels, top_k=20, chunk_size=16)
        got.backward()
        assert w.grad.dtype == dtype and h.grad.dtype == dtype
        want = kd_loss(F.linear(hidden, weight), logits_t, labels, top_k=20)
        assert got.item() == pytest.approx(want.item(), rel=tol)


def test_chunked_errors():
    hidden, weight, teacher_hidden, labels = _setup()
    bad = TeacherHidden(teacher_hidden.hidden, teacher_hidden.output_weight[:-1])
    with pytest.raises(VocabMismatchError, match="teacher vocabulary size 22 != student vocabulary size 23"):
        chunked_kd_loss(hidden, weight, bad, labels)
    with pytest.raises(VocabMismatchError):
        chunked_kd_loss(hidden, weight, torch.zeros(2, 9, 24, dtype=hidden.dtype), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_kd_loss(hidden, weight, teacher_hidden, labels, chunk_size=0)


@pytest.mark.parametrize("form", ["logits", "topk"])
def test_distillation_loss_from_logits_and_from_hidden(form):
    hidden, weight, teacher_hidden, labels = _setup()
    teacher = _teacher_forms(teacher_hidden, k=6)[form]
    batch = {"input_ids": torch.zeros_like(labels), "labels": labels}
    if form == "logits":
        batch["teacher_logits"] = teacher
    else:
        batch["teacher_topk_ids"], batch["teacher_topk_logprobs"] = teacher
    fn = DistillationLoss(kind="forward_kl", temperature=2.0, top_k=4, ce_weight=0.1, chunk_tokens=4)
    total = fn.from_logits(batch, F.linear(hidden, weight))
    want, n = kd_loss_sum(F.linear(hidden, weight), teacher, labels, temperature=2.0, top_k=4, ce_weight=0.1)
    assert total.item() == pytest.approx(want.item(), rel=1e-12)
    chunked = fn.from_hidden(batch, StudentHidden(hidden, weight))
    assert chunked.item() == pytest.approx(want.item(), rel=1e-12)
    unchunked = DistillationLoss(top_k=4, temperature=2.0, ce_weight=0.1, chunk_tokens=0)
    assert unchunked(batch, StudentHidden(hidden, weight)).item() == pytest.approx(want.item(), rel=1e-12)
    with pytest.raises(KeyError, match="no teacher target"):
        fn({"labels": labels}, F.linear(hidden, weight))
    with pytest.raises(ValueError, match="beta"):
        DistillationLoss(kind="jsd", beta=0.0)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_masked_teacher_and_large_logits_float32(kind, top_k):
    hidden, weight, teacher_hidden, labels = _setup(dtype=torch.float32, V=40)
    weight = weight * 30  # logits in the hundreds
    teacher = F.linear(teacher_hidden.hidden, teacher_hidden.output_weight) * 30
    teacher[..., :7] = float("-inf")  # tokens the teacher never emits
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = kd_loss(F.linear(h1, w1), teacher, labels, kind=kind, top_k=top_k, temperature=2.0, ce_weight=0.2,
                   fused=False)
    want.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = chunked_kd_loss(h2, w2, teacher, labels, kind=kind, top_k=top_k, temperature=2.0, ce_weight=0.2,
                          chunk_size=4)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(w2.grad).all()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 1.5])
def test_chunked_many_rows_per_chunk(kind, T):
    """Chunks larger than the 64-row blocks used inside the fused kernel."""
    hidden, weight, teacher_hidden, labels = _setup(B=3, T=50, V=31)
    logits_t = F.linear(teacher_hidden.hidden, teacher_hidden.output_weight)
    for teacher, top_k in ((logits_t, None), (logits_t, 6)):
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        want = kd_loss(F.linear(h1, w1), teacher, labels, kind=kind, temperature=T, top_k=top_k, ce_weight=0.3,
                       fused=False)
        want.backward()
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        got = chunked_kd_loss(h2, w2, teacher, labels, kind=kind, temperature=T, top_k=top_k,
                              ce_weight=0.3, chunk_size=150)
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-10, atol=1e-12)

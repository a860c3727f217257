"""The Loss interface: what each loss takes, and that every input gives the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from ct_model.batch import ModelOutput, VocabShard
from ct_model.loss import CrossEntropyLoss, FunctionLoss, Loss, LossInput, as_loss

V, H = 50, 16


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 9, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (2, 9), generator=g)
    labels[0, :3] = -100
    return {"labels": labels}, ModelOutput(hidden, weight)


def _reference(mb, out):
    """Summed CE by hand: log-sum-exp minus the target logit, over scored positions."""
    logits = out.hidden @ out.output_weight.T
    scored = mb["labels"] != -100
    lse = logits.logsumexp(-1)
    target = logits.gather(-1, mb["labels"].clamp(min=0)[..., None]).squeeze(-1)
    return ((lse - target) * scored).sum()


def _whole_vocab_shard(kernel=None):
    same = lambda x: x  # noqa: E731 (one rank: every reduction is the identity)
    return VocabShard(0, V, sum=same, use_locally=same, max=same, cross_entropy=kernel)


@pytest.mark.parametrize("chunk", [0, 4, 1024])
def test_cross_entropy_from_each_input_equals_the_hand_computation(chunk):
    mb, out = _case()
    loss = CrossEntropyLoss(chunk_tokens=chunk, fused_kernel="none")
    want = _reference(mb, out)
    assert loss.supports(LossInput.HIDDEN) and loss.supports(LossInput.VOCAB_SHARDS)
    per_token = lambda logits, target: F.cross_entropy(logits.transpose(1, -1), target, reduction="none")  # noqa: E731
    for got in (loss.from_hidden(mb, out), loss.from_logits(mb, out.logits()), loss(mb, out),
                loss.from_vocab_shards(mb, out.logits(), _whole_vocab_shard(per_token))):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)  # CE sums in fp32


def test_a_shard_without_a_ce_kernel_is_refused_by_name():
    mb, out = _case()
    with pytest.raises(ValueError, match="VocabShard.cross_entropy"):
        CrossEntropyLoss().from_vocab_shards(mb, out.logits(), _whole_vocab_shard())


def test_a_plain_function_is_a_logits_only_loss():
    mb, out = _case()
    seen = []

    def fn(microbatch, logits):
        seen.append(tuple(logits.shape))
        return logits.sum()

    loss = as_loss(fn)
    assert isinstance(loss, FunctionLoss) and loss.supports(LossInput.LOGITS)
    assert not loss.supports(LossInput.HIDDEN) and not loss.supports(LossInput.VOCAB_SHARDS)
    torch.testing.assert_close(loss(mb, out), out.logits().sum())  # hidden states are projected for it
    assert seen == [(2, 9, V)] and as_loss(loss) is loss


def test_bad_settings_and_bad_losses_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="loss.chunk_tokens"):
        CrossEntropyLoss(chunk_tokens=-1)
    with pytest.raises(ValueError, match="loss.fused_kernel"):
        CrossEntropyLoss(fused_kernel="triton")
    with pytest.raises(TypeError, match="ct_model.loss.Loss"):
        as_loss(3)
    with pytest.raises(NotImplementedError, match="hidden states"):
        Loss().from_hidden({}, None)


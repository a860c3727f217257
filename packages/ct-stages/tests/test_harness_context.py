"""CTModelLM never runs past the model's context: scored requests keep their last max_length + 1
tokens, rolling texts are scored in windows of max_length (as lm-eval's HFLM), and the count of
truncated requests is reported."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

import ct_data  # noqa: E402
import ct_model  # noqa: E402
from ct_stages.harness import CTModelLM  # noqa: E402

MAX = 16


@pytest.fixture(scope="module")
def lm():
    tokenizer = ct_data.train_tokenizer(["one two three four five six seven eight nine ten"] * 20, 300,
                                        min_frequency=1)
    config = ct_model.presets.get("mobilellm_tiny", num_layers=1, hidden_size=32, num_attention_heads=2,
                                  num_query_groups=1, ffn_hidden_size=64, vocab_size=len(tokenizer),
                                  max_position_embeddings=MAX, init_method_std=0.3)
    return CTModelLM(ct_model.build_model(config, seed=0), tokenizer)


def scored(model, ids: list[int], n_cont: int) -> float:
    """Sum of log p(last n_cont tokens) with the model run on ids[:-1] (at most MAX positions)."""
    assert len(ids) - 1 <= MAX
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).float()[0, -n_cont:]
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[-n_cont:])[:, None]).sum().item()


def test_loglikelihood_keeps_the_last_max_length_plus_one_tokens(lm):
    tok = lm.tokenizer
    context, continuation = " ".join(["one two three four five"] * 8), " six seven"
    ctx, cont = [tok.bos_id] + tok.encode(context), tok.encode(continuation)
    assert len(ctx) + len(cont) > MAX + 1
    (logprob, _), = lm.loglikelihood([SimpleNamespace(args=(context, continuation))])
    assert logprob == pytest.approx(scored(lm.model, (ctx + cont)[-(MAX + 1):], len(cont)), abs=1e-5)
    assert lm.truncated["loglikelihood"] == 1


def test_loglikelihood_rolling_scores_windows_of_max_length(lm):
    tok = lm.tokenizer
    text = " ".join(["one two three four five six seven eight nine ten"] * 4)
    ids = tok.encode(text)
    assert len(ids) > 2 * MAX
    # HFLM's windows: the first MAX tokens after BOS, then each next MAX tokens scored with the
    # MAX - 1... context that fits (lm_eval.utils.get_rolling_token_windows, context_len=1).
    total, start = scored(lm.model, [tok.bos_id] + ids[:MAX], MAX), MAX
    while start < len(ids):
        stop = min(start + MAX, len(ids))
        window = ids[stop - MAX - 1:stop]
        total += scored(lm.model, window, stop - start)
        start = stop
    (rolling,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert rolling == pytest.approx(total, abs=1e-4)


def test_generate_until_refuses_a_generation_longer_than_the_context(lm):
    with pytest.raises(ValueError, match="max_gen_toks 16 must be less than the model's context length 16"):
        lm.generate_until([SimpleNamespace(args=("one two", {"until": ["\n"], "max_gen_toks": MAX}))])

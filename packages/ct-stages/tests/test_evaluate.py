"""pass@1, maj@n and pass@n against a hand computation, with the generations fixed in advance."""

import pytest
import torch

from ct_stages import evaluate as ev


class StubTokenizer:
    stop_ids = (0,)
    pad_id = 0

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1]

    def decode(self, ids, skip_special_tokens=True):
        return ids[0]  # the stub generator hands out whole texts


class StubModel(torch.nn.Module):
    output_weight = torch.zeros(1)


def test_sampled_accuracy_by_hand(monkeypatch):
    problems = [{"question": "a", "answer": "1/2"}, {"question": "b", "answer": "7"}]
    # Three draws per problem (draw-major, as the evaluator asks): problem a is right 2 of 3 times,
    # problem b once, and b's majority answer (9) is wrong.
    draws = iter([["\\boxed{3}", "\\boxed{9}"], ["\\boxed{0.5}", "\\boxed{7}"],
                  ["\\boxed{\\frac{1}{2}}", "\\boxed{9}"]])
    monkeypatch.setattr(ev.ct_model, "generate", lambda *a, **k: [[text] for text in next(draws)])
    result = ev.sampled_accuracy(StubModel(), StubTokenizer(), problems, samples=3, temperature=0.7)
    assert result["pass@1"] == pytest.approx(3 / 6)
    assert result["maj@3"] == pytest.approx(1 / 2)  # a: majority 1/2 (0.5 and \frac{1}{2} agree), b: 9
    assert result["pass@3"] == 1.0


def test_sampling_needs_a_temperature():
    with pytest.raises(ValueError, match="temperature > 0"):
        ev.sampled_accuracy(StubModel(), StubTokenizer(), [], samples=2, temperature=0.0)

"""How the native engines meet a ct_model.loss.Loss: what they hand it, what they refuse."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import parallel_testlib as lib  # noqa: E402
from ct_model import build_model  # noqa: E402
from ct_model.loss import CrossEntropyLoss, EngineTeacher, LossInput  # noqa: E402
from ct_parallel import build_native_engine  # noqa: E402


class _Recording(CrossEntropyLoss):
    def __init__(self, inputs):
        super().__init__(chunk_tokens=4, fused_kernel="none")
        self.inputs, self.called = frozenset(inputs), []

    def from_hidden(self, mb, output):
        self.called.append("hidden")
        return super().from_hidden(mb, output)

    def from_logits(self, mb, logits):
        self.called.append("logits")
        return super().from_logits(mb, logits)


def test_the_engine_hands_hidden_states_when_the_loss_takes_them_and_logits_otherwise():
    config = lib.tiny_config(num_layers=1)
    batch = lib.global_batch(config, n_micro=2)
    results = {}
    for name, inputs in {"hidden": LossInput, "logits": [LossInput.LOGITS]}.items():
        loss = _Recording(inputs)
        results[name] = build_native_engine(build_model(config, seed=0)).forward_backward(batch, loss).loss
        assert loss.called == [name, name]
    assert abs(results["hidden"] - results["logits"]) <= lib.TOL * results["logits"]


def test_native_engine_refuses_a_loss_whose_teacher_it_cannot_hold():
    config = lib.tiny_config(num_layers=1)
    loss = CrossEntropyLoss()
    loss.engine_teacher = EngineTeacher(torch.nn.Linear(1, 1))
    engine = build_native_engine(build_model(config, seed=0))
    with pytest.raises(ValueError, match="distributed.engine=megatron"):
        engine.forward_backward(lib.global_batch(config, n_micro=1), loss)

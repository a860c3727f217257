"""FP8 through the native engine: DCP checkpoints hold plain tensors under the unconverted
model's keys, and a tiny model trains 20 steps under FP8 within a few percent of bf16."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402
from ct_model import build_model  # noqa: E402
from ct_parallel import DistributedConfig, build_engine  # noqa: E402
from ct_precision import PrecisionConfig  # noqa: E402


def fp8(recipe: str = "tensorwise") -> PrecisionConfig:
    return PrecisionConfig(dtype="fp8", param_dtype="bfloat16", compute_dtype="bfloat16",
                           fp8_recipe=recipe, fp8_min_matmul_elements=0)


def test_fp8_engine_checkpoint_loads_into_a_plain_fp32_engine(tmp_path):
    """DCP save under FP8, load into an unconverted model: same keys, plain tensors, same values."""
    config = lib.tiny_config(num_layers=2)
    batch = lib.global_batch(config, n_micro=1)
    engine = build_engine(build_model(config, seed=0), DistributedConfig(), precision=fp8())
    assert type(engine.model.layers[0].mlp.up_proj).__name__ == "Float8Linear"
    engine.setup_optimizer(lib.build_optimizer)
    engine.forward_backward(batch, lib.loss_fn)
    engine.optimizer_step()
    engine.save_checkpoint(tmp_path / "ckpt")
    saved = engine.full_model_state_dict()
    assert all(type(v) is torch.Tensor for v in saved.values())

    other = build_engine(build_model(config, seed=1), DistributedConfig(), precision=PrecisionConfig())
    other.setup_optimizer(lib.build_optimizer)
    other.load_checkpoint(tmp_path / "ckpt")
    loaded = other.full_model_state_dict()
    assert list(loaded) == list(saved)
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key
    steps = {int(s["step"]) for s in other.optimizer.state_dict()["state"].values()}
    assert steps == {1}


# ----------------------------------------------------------------- training


def train_losses(precision: PrecisionConfig, steps: int = 20) -> list[float]:
    config = lib.tiny_config(num_layers=2)
    batch = lib.global_batch(config, n_micro=2)
    engine = build_engine(build_model(config, seed=0), DistributedConfig(), precision=precision)
    losses, _, _ = lib.run_engine(engine, batch, steps=steps)
    return losses


@pytest.mark.slow
def test_fp8_trains_20_steps_within_a_few_percent_of_bf16():
    bf16 = train_losses(PrecisionConfig(dtype="bf16", param_dtype="bfloat16", compute_dtype="bfloat16"))
    fp8_losses = train_losses(fp8())
    assert bf16[-1] < 0.8 * bf16[0]  # it learns: the comparison is over a moving curve
    worst = max(abs(a - b) / b for a, b in zip(fp8_losses, bf16))
    assert worst <= 0.03, (fp8_losses, bf16)
    assert fp8_losses != bf16  # FP8 really ran (its rounding differs from bf16)

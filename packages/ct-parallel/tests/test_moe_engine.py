"""The native engine on the MoE model in one process: equal to the hand-written reference of
dist_moe_native_checks.py (aux loss, bias updates), with and without activation checkpointing
(a checkpointed MoE block runs its forward twice: the recomputed aux terms must not be added
again, and the doubled token counts must not change the bias update)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_moe_native_checks as moe_checks  # noqa: E402
import parallel_testlib as lib  # noqa: E402
from ct_model import build_model  # noqa: E402
from ct_parallel import DistributedConfig, build_engine  # noqa: E402
from ct_parallel import ActivationCheckpointConfig  # noqa: E402


STEPS = 2


@pytest.fixture(scope="module")
def reference():
    config = moe_checks.moe_config()
    batch = lib.global_batch(config)
    return config, batch, moe_checks.reference(config, batch, steps=STEPS)


@pytest.mark.parametrize("ac", [dict(mode="none"), dict(mode="full"), dict(mode="selective", every_n_blocks=2)])
def test_single_process_moe_engine_equals_the_reference(reference, ac):
    config, batch, (losses_ref, params_ref, biases_ref) = reference
    model = build_model(config, seed=0)
    engine = build_engine(model, DistributedConfig(), activation_checkpointing=ActivationCheckpointConfig(**ac))
    engine.setup_optimizer(lib.build_optimizer)
    losses = []
    for step in range(STEPS):
        result = engine.forward_backward(batch, lib.loss_fn)
        losses.append(result.loss)
        engine.optimizer_step()
        engine.zero_grad()
        metrics = engine.update_expert_bias()
        lib.compare(f"bias step {step}", moe_checks._biases(model), biases_ref[step], tol=0.0)
        assert set(metrics) == {f"moe/layers.{i}.{k}" for i in (1, 2, 3) for k in ("load_max", "load_min", "bias_range")}
        assert 0 < result.aux_loss < 0.01 * config.num_moe_experts
    lib.compare_losses("loss", losses, losses_ref)
    lib.compare("params", engine.full_model_state_dict(), params_ref, tol=lib.PARAM_TOL)


def test_moe_checkpoint_restores_the_expert_bias_and_continues_identically(reference, tmp_path):
    config, batch, _ = reference

    def engine_from(seed):
        engine = build_engine(build_model(config, seed=seed), DistributedConfig())
        engine.setup_optimizer(lib.build_optimizer)
        return engine

    def step(engine):
        engine.forward_backward(batch, lib.loss_fn)
        engine.optimizer_step()
        engine.zero_grad()
        engine.update_expert_bias()

    trained = engine_from(0)
    step(trained)
    step(trained)
    assert any(float(b.abs().sum()) > 0 for b in moe_checks._biases(trained.model).values())
    trained.save_checkpoint(str(tmp_path / "ckpt"))
    fresh = engine_from(1)
    fresh.load_checkpoint(str(tmp_path / "ckpt"))
    lib.compare("bias after load", moe_checks._biases(fresh.model), moe_checks._biases(trained.model), tol=0.0)
    step(trained)
    step(fresh)
    lib.compare("next step", fresh.full_model_state_dict(), trained.full_model_state_dict(), tol=0.0)

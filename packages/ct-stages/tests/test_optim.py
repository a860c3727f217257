import math

import pytest
import torch

import ct_model
from ct_stages.optim import OptimizerConfig, ScheduleConfig, build_optimizer, lr_factor, parameter_groups


def test_linear_warmup_then_decay_to_floor():
    cfg = ScheduleConfig(name="linear", warmup_steps=4, min_lr_ratio=0.1)
    # Hand values: warmup (s+1)/4; then 1 - 0.9 * (s-4)/(20-4).
    assert [lr_factor(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cfg) == 1.0
    assert lr_factor(12, 20, cfg) == pytest.approx(1 - 0.9 * 8 / 16)
    assert lr_factor(20, 20, cfg) == pytest.approx(0.1)
    assert lr_factor(25, 20, cfg) == pytest.approx(0.1)


def test_warmup_ratio_overrides_steps():
    cfg = ScheduleConfig(name="linear", warmup_steps=50, warmup_ratio=0.1, min_lr_ratio=0.0)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)  # 10 warmup steps
    assert lr_factor(9, 100, cfg) == 1.0
    assert lr_factor(100, 100, cfg) == 0.0


def test_cosine_midpoint_and_end():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert lr_factor(50, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(25, 100, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)


def test_wsd_is_flat_then_decays_over_the_last_fraction():
    cfg = ScheduleConfig(name="wsd", warmup_steps=2, min_lr_ratio=0.0, decay_ratio=0.2)
    assert lr_factor(1, 100, cfg) == 1.0
    assert lr_factor(79, 100, cfg) == 1.0
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == 0.0


def test_constant():
    assert lr_factor(99, 100, ScheduleConfig(name="constant", warmup_steps=0)) == 1.0


def test_parameter_groups_exempt_norms_and_optionally_embeddings():
    model = ct_model.build_model(ct_model.presets.get("mobilellm_tiny", num_layers=1), seed=0)
    names = dict((id(p), n) for n, p in model.named_parameters())
    decay, no_decay = parameter_groups(model.named_parameters(), OptimizerConfig(weight_decay=0.1))
    assert {names[id(p)] for p in no_decay["params"]} == {"layers.0.input_layernorm.weight",
                                                          "layers.0.post_attention_layernorm.weight", "norm.weight"}
    assert "embed_tokens.weight" in {names[id(p)] for p in decay["params"]}
    _, no_decay = parameter_groups(model.named_parameters(), OptimizerConfig(decay_embeddings=False))
    assert "embed_tokens.weight" in {names[id(p)] for p in no_decay["params"]}


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_build_optimizer_kinds(name, cls):
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(name=name, lr=0.01))
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("bad, field", [(dict(name="lion"), "optimizer.name"), (dict(lr=0), "optimizer.lr"),
                                        (dict(betas=(0.9, 1.5)), "optimizer.betas"),
                                        (dict(clip_grad=-1.0), "optimizer.clip_grad")])
def test_optimizer_config_errors_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        OptimizerConfig(**bad)


def test_schedule_config_errors_name_the_field():
    with pytest.raises(ValueError, match="schedule.name"):
        ScheduleConfig(name="step")
    with pytest.raises(ValueError, match="schedule.min_lr_ratio"):
        ScheduleConfig(min_lr_ratio=2.0)

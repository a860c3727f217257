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


# ------------------------------------------------------------------ which Adam kernel, by device

def _fake_cuda_params():
    """Parameters that report device cuda without a GPU (FakeTensorMode: metadata only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return [("w", torch.nn.Parameter(torch.empty(8, 4, device="cuda"))),
                ("norm.weight", torch.nn.Parameter(torch.empty(4, device="cuda")))]


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_is_fused_when_every_parameter_is_on_cuda(name):
    opt = build_optimizer(_fake_cuda_params(), OptimizerConfig(name=name))
    assert opt.defaults["fused"] is True and opt.defaults["foreach"] is None
    assert all(g["fused"] is True for g in opt.param_groups)


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_cpu_keeps_torchs_default_kernel_and_its_exact_steps(name):
    """CPU: no flag (fused=None, foreach=None, torch's default, as before this change), and the
    steps are bit for bit those of a plainly constructed torch optimizer."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    reference = torch.nn.Linear(5, 3)
    reference.load_state_dict(model.state_dict())
    config = OptimizerConfig(name=name, lr=0.01)
    opt = build_optimizer(model.named_parameters(), config)
    assert opt.defaults["fused"] is None and opt.defaults["foreach"] is None
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    ref_opt = cls(parameter_groups(reference.named_parameters(), config), lr=0.01, betas=config.betas, eps=config.eps)
    x = torch.randn(7, 5)
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_mixed_devices_and_sgd_are_left_to_torch():
    cpu = ("c", torch.nn.Parameter(torch.zeros(3, 3)))
    opt = build_optimizer([*_fake_cuda_params(), cpu], OptimizerConfig(name="adamw"))
    assert opt.defaults["fused"] is None
    sgd = build_optimizer(_fake_cuda_params(), OptimizerConfig(name="sgd"))
    assert "fused" not in sgd.defaults or sgd.defaults["fused"] is None


def test_a_checkpoint_from_another_device_keeps_this_devices_kernel():
    """torch's load_state_dict copies the saved groups' flags: a state dict written by a fused
    (CUDA) optimizer must not switch a CPU run to the fused kernel."""
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model.named_parameters(), OptimizerConfig(name="adamw"))
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group["fused"] = True  # as a CUDA run would have written it
    opt.load_state_dict(saved)
    assert all(g["fused"] is None and g["foreach"] is None for g in opt.param_groups)


def test_fused_adamw_steps_dtensor_parameters_like_plain_ones(tmp_path):
    """FSDP2's parameters are DTensors: the fused kernel has a DTensor sharding rule in this torch
    (one gloo rank on CPU, which has a fused kernel too; the rule is device-independent). Three
    steps on a Shard(0) DTensor equal three steps on the plain tensor."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        g = torch.Generator().manual_seed(0)
        w0, grads = torch.randn(6, 4, generator=g), [torch.randn(6, 4, generator=g) for _ in range(3)]
        plain = torch.nn.Parameter(w0.clone())
        shard = torch.nn.Parameter(distribute_tensor(w0.clone(), mesh, [Shard(0)]))
        opts = [torch.optim.AdamW([p], lr=0.1, fused=True) for p in (plain, shard)]
        for grad in grads:
            plain.grad, shard.grad = grad.clone(), distribute_tensor(grad.clone(), mesh, [Shard(0)])
            for o in opts:
                o.step()
        assert torch.equal(shard.full_tensor(), plain.detach())
        assert opts[1].param_groups[0]["fused"] is True
    finally:
        if owns:
            dist.destroy_process_group()

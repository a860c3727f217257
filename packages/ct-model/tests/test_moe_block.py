"""The DeepSeek-V3 MoE block against transformers' DeepseekV3MoE, and the bias update by hand."""

import pytest
import torch

from ct_model import presets
from ct_model.moe import MoE, update_expert_bias

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402


def _pair(seed=0):
    c = presets.get("deepseek_v3_tiny", hidden_size=64, moe_ffn_hidden_size=32,
                    moe_shared_expert_intermediate_size=32)
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=64, moe_intermediate_size=32, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    g = torch.Generator().manual_seed(seed)
    ours, ref = MoE(c), DeepseekV3MoE(hf_cfg)
    for p in ours.parameters():
        p.data.normal_(0, 0.2, generator=g)
    ours.gate.expert_bias.normal_(0, 0.05, generator=g)
    ref.gate.weight.data.copy_(ours.gate.weight)
    ref.gate.e_score_correction_bias.copy_(ours.gate.expert_bias)
    ref.experts.gate_up_proj.data.copy_(ours.gate_up_proj)
    ref.experts.down_proj.data.copy_(ours.down_proj)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ref.shared_experts, name).weight.data.copy_(getattr(ours.shared_experts, name).weight)
    return ours, ref


def test_moe_matches_transformers_deepseek_v3_moe():
    ours, ref = _pair()
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-4)


def test_bias_update_follows_the_sign_rule_and_resets_load():
    ours, _ = _pair()
    ours.train()
    bias_before = ours.gate.expert_bias.clone()
    ours(torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(2)))
    load = ours.gate.load.clone()
    assert load.sum() == 4 * 32 * 2  # dropless: every token reaches k=2 experts
    metrics = update_expert_bias(ours)
    rate = ours.config.moe_router_bias_update_rate
    expected = bias_before + rate * torch.sign(load.mean() - load)
    torch.testing.assert_close(ours.gate.expert_bias, expected)
    assert ours.gate.load.sum() == 0
    assert metrics["gate.load_max"] == pytest.approx((load.max() / load.sum()).item())
    assert metrics["gate.load_min"] == pytest.approx((load.min() / load.sum()).item())
    # Bias is a buffer: the optimizer never sees it.
    assert all(p is not ours.gate.expert_bias for p in ours.parameters())


@pytest.fixture
def implementation(monkeypatch):
    import ct_model.moe as moe_mod

    def use(name):
        monkeypatch.setattr(moe_mod, "expert_implementation", name)

    return use


def _run(module, x, implementation, name):
    implementation(name)
    module.zero_grad()
    x = x.clone().requires_grad_(True)
    out = module(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def test_grouped_gemm_equals_the_per_expert_loop_with_gradients(implementation):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    ours, _ = _pair(seed=3)
    x = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(4))
    loop = _run(ours, x, implementation, "loop")
    grouped = _run(ours, x, implementation, "grouped")
    torch.testing.assert_close(grouped[0], loop[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grouped[1], loop[1], atol=1e-5, rtol=1e-5)
    for name, grad in loop[2].items():
        torch.testing.assert_close(grouped[2][name], grad, atol=1e-5, rtol=1e-5, msg=name)
    # An expert no token chooses (its selection bias far down) is an empty range in the grouped call.
    with torch.no_grad():
        ours.gate.expert_bias[0] = -10.0
    assert 0 not in ours.gate(x.view(-1, 64))[1]
    loop = _run(ours, x, implementation, "loop")
    grouped = _run(ours, x, implementation, "grouped")
    torch.testing.assert_close(grouped[0], loop[0], atol=1e-5, rtol=1e-5)
    assert grouped[2]["gate_up_proj"][0].abs().sum() == 0
    torch.testing.assert_close(grouped[2]["gate_up_proj"], loop[2]["gate_up_proj"], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_uses_grouped_gemm_in_bf16_close_to_fp32_loop(implementation):
    import ct_model.moe as moe_mod

    ours, _ = _pair(seed=5)
    ours = ours.cuda()
    x = torch.randn(4, 64, 64, device="cuda")
    implementation("loop")
    with torch.no_grad():
        want = ours(x)
        implementation("auto")
        bf16 = ours.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        if torch.cuda.get_device_capability() >= (9, 0):
            assert moe_mod.use_grouped_gemm(xb.view(-1, 64), bf16)
        got = bf16(xb).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_router_scores_stay_fp32_under_autocast():
    ours, _ = _pair(seed=6)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = ours.gate(x)[2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = ours.gate(x)[2]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_autocast_bf16_takes_the_grouped_gemm_where_the_device_has_it(implementation, monkeypatch):
    """Under autocast the MoE receives the fp32 output of an RMSNorm while its GEMMs run in bf16:
    the choice follows the compute dtype (it never took the grouped path on single/DDP before), and
    the grouped call computes in bf16, close to the fp32 loop."""
    import ct_model.moe as moe_mod

    ours, _ = _pair(seed=8)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(9))
    implementation("loop")
    with torch.no_grad():
        want = ours(x)
    implementation("auto")
    monkeypatch.setattr(moe_mod, "fast_grouped_gemm_device", lambda device: True)  # as on a Hopper GPU
    calls = []
    grouped = moe_mod.MoE._routed_grouped
    monkeypatch.setattr(moe_mod.MoE, "_routed_grouped", lambda self, *a: calls.append(a[0].dtype) or grouped(self, *a))
    tokens = x.view(-1, 64)
    assert not moe_mod.use_grouped_gemm(tokens, ours)  # fp32 without autocast: the loop
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe_mod.use_grouped_gemm(tokens, ours)
        got = ours(x)
    assert calls == [torch.float32]  # fp32 tokens in, bf16 GEMMs inside
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2

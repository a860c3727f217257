"""FP8 (torchao Float8Linear, emulated on CPU) against an independent fake-quant reference, the
layer rules on mobilellm_tiny, and plain tensors in the state dict. Engine-level FP8 (checkpoints,
training against bf16) is tested in packages/ct-parallel/tests/test_fp8_engine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ct_model import build_model, presets
from ct_precision import PrecisionConfig, convert_to_fp8, fp8_layer_names

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8(recipe: str = "tensorwise", min_elements: int = 0) -> PrecisionConfig:
    return PrecisionConfig(dtype="fp8", param_dtype="bfloat16", compute_dtype="bfloat16",
                           fp8_recipe=recipe, fp8_min_matmul_elements=min_elements)


# ----------------------------------------------------------------- the fake-quant reference


def fake_quant(t: torch.Tensor, dtype: torch.dtype, dim: int | None, pow2: bool) -> torch.Tensor:
    """Scale into the FP8 range (max / amax, per tensor or per slice along ``dim``), round to
    ``dtype`` with saturation, and divide the scale back out."""
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (torch.finfo(dtype).max / amax.double().clamp(min=1e-12)).float()
    if pow2:
        scale = 2.0 ** torch.floor(torch.log2(scale))
    limit = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-limit, limit).to(dtype).float() / scale


def reference_linear(x: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor, recipe: str):
    """(output, grad_input, grad_weight) of y = x @ w.T with each GEMM's operands fake-quantised
    as the recipe says. tensorwise: one scale per tensor, e4m3 for x and w, e5m2 for grad_out.
    rowwise: e4m3 everywhere, power-of-2 scales, each operand scaled along its GEMM's reduction
    dim (x per token, w per output row in forward; per input column of w and per token of
    grad_out for grad_input; per feature of x and grad_out for grad_weight)."""
    x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
    rows = recipe == "rowwise"
    grad_dtype = E4M3 if rows else E5M2

    def q(t, dtype, dim):
        return fake_quant(t, dtype, dim if rows else None, pow2=rows)

    out = q(x2, E4M3, -1) @ q(w, E4M3, -1).t()
    grad_input = q(g2, grad_dtype, -1) @ q(w, E4M3, 0)
    grad_weight = q(g2, grad_dtype, 0).t() @ q(x2, E4M3, 0)
    return out.reshape(*x.shape[:-1], -1), grad_input.reshape(x.shape), grad_weight


class OneLinear(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_linear_forward_backward_equals_fake_quant_reference(recipe):
    torch.manual_seed(0)
    model = OneLinear(64, 48)
    w = model.proj.weight.detach().clone()
    # Outliers so per-row scales differ from the per-tensor one (and rowwise != tensorwise).
    x = torch.randn(2, 8, 64) * torch.linspace(0.1, 4.0, 16).reshape(2, 8, 1)
    grad_out = torch.randn(2, 8, 48) * torch.linspace(0.01, 3.0, 48)
    convert_to_fp8(model, fp8(recipe))
    assert type(model.proj).__name__ == "Float8Linear"

    x.requires_grad_(True)
    out = model(x)
    out.backward(grad_out)
    want_out, want_gx, want_gw = reference_linear(x.detach(), w, grad_out, recipe)
    assert max_rel(out.detach(), want_out) <= 1e-6
    assert max_rel(x.grad, want_gx) <= 1e-6
    assert max_rel(model.proj.weight.grad, want_gw) <= 1e-6
    # The reference is not the plain fp32 linear: FP8 rounding is visible at this size.
    assert max_rel(want_out, x.detach() @ w.t()) > 1e-3


# ----------------------------------------------------------------- which layers convert


def per_block(names: list[str], layers: int) -> list[str]:
    return [f"layers.{i}.{n}" for i in range(layers) for n in names]


ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.mark.parametrize("overrides, min_elements, want", [
    # mobilellm_tiny: q/o 256x256, k/v 256x128, MLP 256x768 (4 layers, tied embeddings).
    ({}, 0, per_block(ATTN + MLP, 4)),
    # the size rule: 256*768 = 196608 passes 131072; 256*256 does not.
    ({}, 131072, per_block(MLP, 4)),
    # the fp8 preset's rule (2048*2048) converts nothing at this size.
    ({}, 2048 * 2048, []),
    # untied: lm_head is an nn.Linear (256x8192) and stays high precision by name.
    ({"share_embeddings_and_output_weights": False}, 0, per_block(ATTN + MLP, 4)),
    # FFN 200 is not a multiple of 16: the MLP stays high precision.
    ({"ffn_hidden_size": 200}, 0, per_block(ATTN, 4)),
])
def test_which_layers_of_mobilellm_tiny_convert(overrides, min_elements, want):
    model = build_model(presets.get("mobilellm_tiny", **overrides), seed=0)
    assert fp8_layer_names(model, fp8(min_elements=min_elements)) == want
    convert_to_fp8(model, fp8(min_elements=min_elements))
    converted = [n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"]
    assert converted == want
    assert all(type(m) is nn.Linear for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n not in want)


def test_refusals_name_the_recipe_and_device():
    model = OneLinear(64, 48)
    with pytest.raises(ValueError, match=r"precision.fp8_recipe=mxfp8.*cpu"):
        convert_to_fp8(model, fp8("mxfp8"))
    with pytest.raises(ValueError, match="precision.dtype=fp8"):
        convert_to_fp8(model, PrecisionConfig(dtype="bf16", param_dtype="bfloat16", compute_dtype="bfloat16"))


def test_cpu_fp8_logs_that_it_is_emulated(caplog):
    import ct_precision.fp8 as fp8_mod

    fp8_mod._warned_cpu = False
    with caplog.at_level("WARNING", logger="ct_precision"):
        convert_to_fp8(OneLinear(64, 48), fp8())
        convert_to_fp8(OneLinear(64, 48), fp8())
    assert [r.getMessage() for r in caplog.records] == ["FP8 on CPU is emulated (slow); numerics only"]


# ----------------------------------------------------------------- plain tensors, same keys


def test_state_dict_after_conversion_has_the_same_keys_and_plain_tensors():
    config = presets.get("mobilellm_tiny", share_embeddings_and_output_weights=False)
    plain, converted = build_model(config, seed=0), convert_to_fp8(build_model(config, seed=0), fp8())
    want, got = plain.state_dict(), converted.state_dict()
    assert list(got) == list(want)
    for key, value in got.items():
        assert type(value) is torch.Tensor and value.dtype == torch.float32, key
        assert torch.equal(value, want[key]), key

"""FLOPs per token for MoE/MLA models: active parameters only, checked against hand sums."""

import ct_model
from ct_model import presets
from ct_stages.metrics import flops_per_token


def test_flops_per_token_uses_active_parameters():
    c = presets.get("deepseek_v3_671b")
    active_matmul = ct_model.param_count.matmul_parameters(c, active=True) + c.vocab_size * c.hidden_size
    attention = 6 * 61 * 128 * (192 + 128) * 4096
    assert flops_per_token(c, 4096) == 6.0 * active_matmul + attention
    # Dense models keep the previous formula: 6 N + 12 L H d T.
    d = presets.get("mobilellm_140m")
    dense = ct_model.param_count.block_matmul_parameters(d) * 15 + d.vocab_size * d.hidden_size
    assert flops_per_token(d, 2048) == 6.0 * dense + 12 * 15 * 9 * 64 * 2048

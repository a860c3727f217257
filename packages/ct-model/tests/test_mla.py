"""MLA attention against transformers' DeepseekV3Attention (same weights), and its cache."""

import pytest
import torch

from ct_model import presets
from ct_model.attention import build_mask_info
from ct_model.layers import KVCache
from ct_model.mla import MLAttention
from ct_model.rope import rope_angles

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_ds  # noqa: E402


def _config(q_lora_rank, style):
    return presets.get("deepseek_v3_tiny", hidden_size=64, num_attention_heads=4, q_lora_rank=q_lora_rank,
                       kv_lora_rank=24, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12,
                       rope_style=style, rotary_base=500.0)


def _pair(q_lora_rank, style, seed=0):
    c = _config(q_lora_rank, style)
    hf_cfg = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        rope_interleave=style == "interleaved", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    hf_cfg._attn_implementation = "eager"
    ours, ref = MLAttention(c), hf_ds.DeepseekV3Attention(hf_cfg, layer_idx=0)
    g = torch.Generator().manual_seed(seed)
    for p in ours.parameters():
        p.data.normal_(0, 0.15, generator=g)
    for name, p in ours.named_parameters():
        ref.get_parameter(name).data.copy_(p)
    return c, hf_cfg, ours, ref


@pytest.mark.parametrize("q_lora_rank", [None, 40])
@pytest.mark.parametrize("style", ["interleaved", "rotate_half"])
def test_mla_matches_transformers_attention(q_lora_rank, style):
    c, hf_cfg, ours, ref = _pair(q_lora_rank, style)
    b, t = 2, 11
    x = torch.randn(b, t, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(t).expand(b, t)
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    cos_sin = hf_ds.DeepseekV3RotaryEmbedding(hf_cfg)(x, pos)
    with torch.no_grad():
        expected, _ = ref(x, cos_sin, causal)
        got = ours(x, rope_angles(pos, c.rope_dim, c.rotary_base), None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # Scale: transformers' (nope + rope) ** -0.5 without rope scaling.
    assert ref.scaling == pytest.approx((16 + 8) ** -0.5)


def test_mla_packed_documents_and_cache():
    c, _, ours, _ = _pair(40, "interleaved")
    a, b_ = (torch.randn(1, n, 64, generator=torch.Generator().manual_seed(n)) for n in (6, 5))
    pos = lambda n: torch.arange(n)[None]  # noqa: E731
    rope = lambda p: rope_angles(p, c.rope_dim, c.rotary_base)  # noqa: E731
    with torch.no_grad():
        docs = torch.tensor([[0] * 6 + [1] * 5])
        packed = ours(torch.cat((a, b_), 1), rope(torch.cat((pos(6), pos(5)), 1)),
                      build_mask_info(docs, "sdpa"))
        torch.testing.assert_close(packed[:, :6], ours(a, rope(pos(6)), None), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 6:], ours(b_, rope(pos(5)), None), atol=1e-5, rtol=1e-5)
        # Cached decoding, one token at a time, equals the full causal forward.
        cache = KVCache()
        full = ours(a, rope(pos(6)), None)
        first = ours(a[:, :4], rope(pos(4)), None, cache)
        steps = [ours(a[:, i:i + 1], rope(pos(6)[:, i:i + 1]), torch.ones(1, 1, 1, i + 1, dtype=torch.bool), cache)
                 for i in (4, 5)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=1e-5, rtol=1e-5)
    assert cache.k.shape == (1, 1, 6, c.kv_lora_rank)  # the latent is cached, not per-head k/v

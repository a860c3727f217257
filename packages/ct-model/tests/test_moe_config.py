"""DeepSeek-V3 (MLA + MoE) ModelConfig fields, presets and parameter counts.

References: transformers' DeepseekV3ForCausalLM built on the meta device (total counts) and a
hand computation from the published shape (active parameters per token).
"""

import time

import pytest
import torch

import ct_model
from ct_model import ConfigError, presets

transformers = pytest.importorskip("transformers")


def _hf_config(c: ct_model.ModelConfig):
    return transformers.DeepseekV3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.ffn_hidden_size,
        moe_intermediate_size=c.moe_ffn_hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_attention_heads,
        n_shared_experts=c.moe_shared_expert_intermediate_size // c.moe_ffn_hidden_size,
        n_routed_experts=c.num_moe_experts, num_experts_per_tok=c.moe_router_topk,
        n_group=c.moe_router_num_groups, topk_group=c.moe_router_group_topk,
        routed_scaling_factor=c.moe_router_topk_scaling_factor,
        first_k_dense_replace=c.moe_first_dense_layers, q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_head_dim,
        qk_rope_head_dim=c.qk_pos_emb_head_dim, v_head_dim=c.v_head_dim,
        tie_word_embeddings=c.share_embeddings_and_output_weights,
    )


def _hf_meta_count(hf_config) -> int:
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # ~20 s: transformers builds 61 layers of modules on meta
def test_671b_count_equals_transformers_default_config_on_meta():
    c = presets.get("deepseek_v3_671b")
    assert ct_model.count_parameters(c) == 671_026_404_352
    assert _hf_meta_count(transformers.DeepseekV3Config()) == 671_026_404_352


def test_tiny_count_equals_transformers_and_is_divisible_by_two():
    c = presets.get("deepseek_v3_tiny")
    assert ct_model.count_parameters(c) == _hf_meta_count(_hf_config(c))
    assert 1_000_000 < ct_model.count_parameters(c) < 10_000_000
    assert c.vocab_size == 8192
    for n in (c.num_attention_heads, c.num_moe_experts, c.num_layers, c.moe_router_num_groups):
        assert n % 2 == 0
    assert c.moe_first_dense_layers == 1 and c.q_lora_rank and c.moe_shared_expert_intermediate_size


def test_671b_active_parameters_by_hand():
    # Per token: embeddings + head, 61 MLA blocks, 3 dense MLPs, 58 x (router + 8 routed + 1 shared).
    h, heads = 7168, 128
    mla = (h * 1536 + 1536 + 1536 * heads * 192 + h * 576 + 512 + 512 * heads * 256
           + heads * 128 * h + 2 * h)
    moe_active = 256 * h + 9 * 3 * h * 2048
    expected = 2 * 129_280 * h + 61 * mla + 3 * 3 * h * 18_432 + 58 * moe_active + h
    assert ct_model.count_active_parameters(presets.get("deepseek_v3_671b")) == expected
    assert expected == 37_552_282_624


def test_dense_active_equals_total():
    c = presets.get("mobilellm_950m")
    assert ct_model.count_active_parameters(c) == ct_model.count_parameters(c)


@pytest.mark.parametrize("change, field", [
    (dict(moe_router_topk=9), "moe_router_topk"),
    (dict(num_moe_experts=0), "num_moe_experts"),
    (dict(moe_ffn_hidden_size=None), "moe_ffn_hidden_size"),
    (dict(moe_router_num_groups=3), "moe_router_num_groups"),
    (dict(moe_router_group_topk=5), "moe_router_group_topk"),
    (dict(moe_router_group_topk=None), "moe_router_group_topk"),
    (dict(moe_router_score_function="relu"), "moe_router_score_function"),
    (dict(moe_first_dense_layers=5), "moe_first_dense_layers"),
    (dict(moe_router_topk_scaling_factor=0.0), "moe_router_topk_scaling_factor"),
    (dict(moe_aux_loss_coeff=-1.0), "moe_aux_loss_coeff"),
    (dict(qk_pos_emb_head_dim=15), "qk_pos_emb_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-4), "q_lora_rank"),
])
def test_bad_moe_mla_fields_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        presets.get("deepseek_v3_tiny", **change)


def test_moe_layer_selection():
    c = presets.get("deepseek_v3_671b")
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert not presets.get("mobilellm_tiny").is_moe_layer(0)


def test_671b_config_is_instant_and_builds_on_meta_in_seconds():
    start = time.perf_counter()
    ct_model.count_parameters(presets.get("deepseek_v3_671b"))
    assert time.perf_counter() - start < 1
    start = time.perf_counter()
    model = ct_model.build_model(presets.get("deepseek_v3_671b"), device="meta")
    # ~0.1 s once torch's lazy imports are done (~6 s the first time in a process).
    assert time.perf_counter() - start < 30
    assert ct_model.count_parameters(model) == 671_026_404_352
    assert all(p.is_meta for p in model.parameters())

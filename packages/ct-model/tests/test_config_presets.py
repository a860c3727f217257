import time

import pytest
import torch

import ct_model
from ct_model import ConfigError, ModelConfig, presets

# Parameter counts fixed by the issue (paper shapes, tied 128,256 vocab; Llama-2-7B, Llama-3-70B).
EXPECTED = {
    "mobilellm_140m": 140_248_512,
    "mobilellm_360m": 359_431_168,
    "mobilellm_950m": 949_685_760,
    "llama2_7b": 6_738_415_616,
    "llama3_70b": 70_553_706_496,
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts_on_meta(name):
    config = presets.get(name)
    model = ct_model.build_model(config, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert ct_model.count_parameters(model) == EXPECTED[name]
    assert ct_model.count_parameters(config) == EXPECTED[name]


def test_tiny_preset_is_small_and_divisible_for_tp_pp():
    c = presets.get("mobilellm_tiny")
    assert 1_000_000 < ct_model.count_parameters(c) < 10_000_000
    assert c.num_attention_heads % 2 == 0 and c.num_query_groups % 2 == 0 and c.num_layers % 2 == 0
    assert c.qk_layernorm and c.rope_style == "interleaved" and c.share_embeddings_and_output_weights


def test_70b_builds_on_meta_in_seconds():
    start = time.perf_counter()
    ct_model.build_model(presets.get("llama3_70b"), device="meta")
    assert time.perf_counter() - start < 10


def test_init_weights_uses_configured_std():
    config = presets.get("mobilellm_tiny", init_method_std=0.05)
    model = ct_model.build_model(config, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(0)
    w = model.layers[0].mlp.up_proj.weight
    assert abs(w.std().item() - 0.05) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


def test_presets_unknown_name_lists_known():
    with pytest.raises(ConfigError, match="mobilellm_tiny"):
        presets.get("nope")
    assert set(EXPECTED) | {"mobilellm_tiny", "deepseek_v3_tiny", "deepseek_v3_671b"} == set(presets.names())


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_attention_heads=6, num_query_groups=4), "num_query_groups"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(rope_style="complex"), "rope_style"),
        (dict(kv_channels=33), "kv_channels"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(layernorm_epsilon=0.0), "layernorm_epsilon"),
        (dict(num_layers=2.5), "num_layers"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    base = presets.get("mobilellm_tiny").to_dict()
    with pytest.raises(ConfigError, match=field):
        ModelConfig(**{**base, **changes})


def test_heads_must_divide_hidden_without_kv_channels():
    with pytest.raises(ConfigError, match="kv_channels"):
        ModelConfig(num_layers=1, hidden_size=100, num_attention_heads=3, ffn_hidden_size=8, vocab_size=10)


def test_from_dict_rejects_unknown_field():
    with pytest.raises(ConfigError, match="hidden_dim"):
        ModelConfig.from_dict({**presets.get("mobilellm_tiny").to_dict(), "hidden_dim": 3})

"""Logit parity with HF transformers, both directions, both architectures (fp32, <= 1e-4)."""

import json

import pytest
import torch

import ct_model
from ct_model import ConfigError, presets
from ct_model.hf import HFFormatError, load_hf, save_hf

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_llama4_config(**overrides):
    values = dict(
        vocab_size=101, hidden_size=64, intermediate_size=96, intermediate_size_mlp=96,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
        use_qk_norm=True, no_rope_layers=[1, 1, 1], moe_layers=[], attention_chunk_size=None,
        attn_temperature_tuning=False, rope_parameters={"rope_type": "default", "rope_theta": 8_000_000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return transformers.Llama4TextConfig(**values)


def hf_llama_config(**overrides):
    values = dict(
        vocab_size=103, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return transformers.LlamaConfig(**values)


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ours_logits(model, ids):
    with torch.no_grad():
        return model(ids)


def random_hf(cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF inits norms to ones; randomise them so the mapping is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "cls, make_config, arch",
    [
        ("Llama4ForCausalLM", hf_llama4_config, "llama4"),
        ("LlamaForCausalLM", hf_llama_config, "llama"),
    ],
)
def test_import_from_transformers(tmp_path, cls, make_config, arch):
    hf_model = random_hf(getattr(transformers, cls), make_config(), seed=0)
    hf_model.save_pretrained(tmp_path)
    model, config = load_hf(tmp_path)
    assert config.rope_style == ("interleaved" if arch == "llama4" else "rotate_half")
    ids = torch.randint(0, config.vocab_size, (2, 17))
    diff = (ours_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item()
    assert diff <= TOL


@pytest.mark.parametrize(
    "overrides, arch",
    [
        (dict(), "llama4"),  # MobileLLM-R1 layout: interleaved RoPE + QK-norm, tied
        (dict(rope_style="rotate_half", qk_layernorm=False, share_embeddings_and_output_weights=False), "llama"),
        (dict(qk_layernorm=False), "llama"),  # interleaved weights permuted into rotate-half
        (dict(rope_style="rotate_half"), "llama4"),  # rotate-half weights permuted into interleaved
        (dict(layer_sharing=True), "llama4"),  # shared blocks exported twice
    ],
)
def test_export_loads_in_transformers_with_identical_logits(tmp_path, overrides, arch):
    config = presets.get(
        "mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, vocab_size=101, **overrides,
    )
    model = ct_model.build_model(config, seed=1).eval()
    with torch.no_grad():
        for block in model.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
    save_hf(model, tmp_path, arch=arch)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected_cls = "Llama4ForCausalLM" if arch == "llama4" else "LlamaForCausalLM"
    assert type(hf_model).__name__ == expected_cls
    ids = torch.randint(0, 101, (2, 19))
    diff = (ours_logits(model, ids) - hf_logits(hf_model, ids)).abs().max().item()
    assert diff <= TOL
    # ...and our own loader reads it back exactly.
    again, _ = load_hf(tmp_path)
    assert (ours_logits(again, ids) - ours_logits(model, ids)).abs().max().item() <= TOL


def test_export_llama_rejects_qk_norm(tmp_path):
    model = ct_model.build_model(presets.get("mobilellm_tiny", num_layers=2, vocab_size=64), seed=0)
    with pytest.raises(ConfigError, match="qk_layernorm"):
        save_hf(model, tmp_path, arch="llama")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(HFFormatError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(HFFormatError, match="gpt2"):
        load_hf(tmp_path)
    hf_llama4_config(moe_layers=[1]).save_pretrained(tmp_path)
    with pytest.raises(HFFormatError, match="MoE"):
        load_hf(tmp_path)
    hf_llama_config().save_pretrained(tmp_path)
    with pytest.raises(HFFormatError, match="safetensors"):
        load_hf(tmp_path)

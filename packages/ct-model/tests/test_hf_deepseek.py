"""DeepseekV3ForCausalLM import/export: logit parity with transformers (fp32, <= 1e-4), both
directions, on random tiny configs; refusals name the field."""

import json

import pytest
import torch

import ct_model
from ct_model import ConfigError, presets
from ct_model.hf import HFFormatError, load_hf, save_hf
from ct_model.moe import Router

transformers = pytest.importorskip("transformers")

TOL = 1e-4


def hf_config(**overrides):
    values = dict(
        vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        routed_scaling_factor=2.5, q_lora_rank=40, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, tie_word_embeddings=False,
        max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return transformers.DeepseekV3Config(**values)


VARIANTS = [
    {},
    dict(q_lora_rank=None, rope_interleave=False, first_k_dense_replace=0, n_group=1, topk_group=1),
    dict(tie_word_embeddings=True, n_shared_experts=2, num_experts_per_tok=3, routed_scaling_factor=1.0),
]


def randomise_hf(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3 if "gate.weight" in name else 0.08, generator=g)
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1, generator=g)  # a bias that changes which experts are chosen
    return model.eval()


def logits_ours(model, ids):
    with torch.no_grad():
        return model(ids)


def logits_hf(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("overrides", VARIANTS)
def test_import_from_transformers(tmp_path, overrides):
    torch.manual_seed(0)
    hf_model = randomise_hf(transformers.DeepseekV3ForCausalLM(hf_config(**overrides)), seed=1)
    hf_model.save_pretrained(tmp_path)
    model, config = load_hf(tmp_path)
    assert config.rope_style == ("interleaved" if overrides.get("rope_interleave", True) else "rotate_half")
    ids = torch.randint(0, 101, (2, 19))
    diff = (logits_ours(model.eval(), ids) - logits_hf(hf_model, ids)).abs().max().item()
    assert diff <= TOL
    bias = hf_model.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(model.layers[1].mlp.gate.expert_bias, bias)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(rope_style="rotate_half", q_lora_rank=None, moe_router_num_groups=None, moe_router_group_topk=None),
    dict(share_embeddings_and_output_weights=True, moe_first_dense_layers=0),
])
def test_export_loads_in_transformers_with_identical_logits(tmp_path, overrides):
    shape = dict(vocab_size=103, hidden_size=64, ffn_hidden_size=80, moe_ffn_hidden_size=16,
                 moe_shared_expert_intermediate_size=32, kv_lora_rank=24, q_lora_rank=40, qk_head_dim=16,
                 qk_pos_emb_head_dim=8, v_head_dim=12, num_layers=3, rotary_base=700.0)
    c = presets.get("deepseek_v3_tiny", **{**shape, **overrides})
    model = ct_model.build_model(c, seed=2).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
        for m in model.modules():
            if isinstance(m, Router):
                m.weight.normal_(0, 0.3, generator=g)
                m.expert_bias.normal_(0, 0.1, generator=g)
    save_hf(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["architectures"] == ["DeepseekV3ForCausalLM"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(0, 103, (2, 17))
    assert (logits_ours(model, ids) - logits_hf(theirs, ids)).abs().max().item() <= TOL
    # And back: our loader reads the export bit for bit.
    again, again_config = load_hf(tmp_path)
    assert again_config == c.replace(name=again_config.name, init_method_std=c.init_method_std)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_refusals_name_the_field(tmp_path):
    torch.manual_seed(0)
    transformers.DeepseekV3ForCausalLM(hf_config()).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["rope_parameters"] = {"rope_type": "yarn", "factor": 40.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(HFFormatError, match="rope_scaling type 'yarn'"):
        load_hf(tmp_path)
    softmax = presets.get("deepseek_v3_tiny", moe_router_score_function="softmax", num_layers=2)
    with pytest.raises(ConfigError, match="moe_router_score_function"):
        save_hf(ct_model.build_model(softmax, seed=0), tmp_path / "x")
    with pytest.raises(ConfigError, match="deepseek_v3"):
        save_hf(ct_model.build_model(softmax, seed=0), tmp_path / "y", arch="llama")

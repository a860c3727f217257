"""An HF export used as it is by a user's transformers stack: ``generate`` stops at the end of a
turn (config.json names the BOS/EOS ids, generation_config.json the ids generation stops on), and
the sister BitNet library's loading recipe (AutoModelForCausalLM + AutoTokenizer on one directory,
then every q/k/v/o_proj under a ``self_attn`` and every gate/up/down_proj under an ``mlp`` or
``feed_forward`` replaced by its own nn.Linear subclass) gives ct-model's logits, for each
architecture ct-model exports."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import ct_data  # noqa: E402
import ct_model  # noqa: E402
from ct_model import presets  # noqa: E402

TOL = 1e-4
TEXTS = ["Janet has 3 ducks and 7 cows. How many animals? 10.", "The cat sat on the mat, and then it slept.",
         "Question: what is 12 plus 30? Answer: 42"] * 20


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ct_data.train_tokenizer(TEXTS, 300, min_frequency=1, split_digits=True)


def export(model, tokenizer, out, arch=None):
    ids = ct_model.hf.token_ids(tokenizer.bos_id, tokenizer.stop_ids, tokenizer.pad_id)
    ct_model.hf.save_hf(model, out, arch=arch, token_ids=ids)
    tokenizer.save(str(out))
    return out


def test_export_names_bos_and_eos_and_generate_stops_at_the_end_of_a_turn(tmp_path, tokenizer):
    config = presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=4,
                         num_query_groups=2, ffn_hidden_size=96, vocab_size=len(tokenizer),
                         share_embeddings_and_output_weights=False)
    model = ct_model.build_model(config, seed=0).eval()
    prompt = [tokenizer.bos_id] + tokenizer.encode("The cat sat on")
    with torch.no_grad():
        free = ct_model.generate(model, [prompt], 6)[0]  # greedy, no stop ids
        # Make the end-of-turn token the greedy choice wherever free[2] was: its output row is
        # free[2]'s, doubled (the winning logit is positive). Generation must now end there.
        model.lm_head.weight[tokenizer.eot_id] = 2 * model.lm_head.weight[free[2]]
        expected = ct_model.generate(model, [prompt], 20, eos_ids=tokenizer.stop_ids)[0]
    assert expected[-1] == tokenizer.eot_id and len(expected) <= 3
    out = export(model, tokenizer, tmp_path / "hf")

    meta = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    stop = sorted(tokenizer.stop_ids)  # end-of-text, end-of-message, end-of-turn (Llama-3's three)
    assert {tokenizer.eos_id, tokenizer.eot_id} <= set(stop) and len(stop) == 3
    assert meta["bos_token_id"] == generation["bos_token_id"] == tokenizer.bos_id
    assert meta["eos_token_id"] == generation["eos_token_id"] == stop
    assert generation["pad_token_id"] == tokenizer.pad_id

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    inputs = hf_tok("The cat sat on", return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == prompt
    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert generated == expected  # stopped at the end-of-turn token, not 20 tokens later


class UserLinear(nn.Linear):
    """The user's replacement layer (a BitLinear, say): here an exact copy that counts its calls."""

    calls = 0

    def forward(self, x):
        UserLinear.calls += 1
        return super().forward(x)


ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}


def replace_like_bitnet(model: nn.Module) -> list[str]:
    """The recipe as the BitNet library applies it; returns the replaced modules' names."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            ancestors = set(full.split(".")[:-1])
            if not isinstance(child, nn.Linear) or child_name in ("embed_tokens", "lm_head"):
                continue
            if (child_name in ATTENTION and "self_attn" in ancestors) or \
                    (child_name in MLP and ancestors & {"mlp", "feed_forward"}):
                new = UserLinear(child.in_features, child.out_features, bias=child.bias is not None,
                                 dtype=child.weight.dtype)
                new.load_state_dict(child.state_dict())
                setattr(parent, child_name, new)
                replaced.append(full)
    return replaced


DEEPSEEK_SHAPE = dict(vocab_size=300, hidden_size=64, ffn_hidden_size=80, moe_ffn_hidden_size=16,
                      moe_shared_expert_intermediate_size=32, kv_lora_rank=24, q_lora_rank=None, qk_head_dim=16,
                      qk_pos_emb_head_dim=8, v_head_dim=12, num_layers=3)


@pytest.mark.parametrize("preset, overrides, arch, per_layer", [
    # MobileLLM-R1 layout: Llama-4 text (Llama4ForCausalLM), dense feed_forward in every layer
    ("mobilellm_tiny", dict(), "llama4", {0: 7, 1: 7}),
    ("mobilellm_tiny", dict(qk_layernorm=False, rope_style="rotate_half"), "llama", {0: 7, 1: 7}),
    # DeepSeek-V3 (MLA + MoE): q_proj (no q LoRA) and o_proj in attention (kv_a_proj_with_mqa and
    # kv_b_proj keep their names and stay); the dense first layer's mlp and the MoE layers' shared
    # experts (mlp.shared_experts.*) are replaced, the routed experts are not nn.Linear modules
    # (mlp.experts holds gate_up_proj / down_proj as 3-D parameters) and stay as they are.
    ("deepseek_v3_tiny", DEEPSEEK_SHAPE, None, {0: 5, 1: 5, 2: 5}),
])
def test_bitnet_style_load_of_each_architecture_gives_ct_models_logits(tmp_path, tokenizer, preset, overrides,
                                                                       arch, per_layer):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)
    config = presets.get(preset, **{**(base if preset == "mobilellm_tiny" else {}), **overrides,
                                    "vocab_size": len(tokenizer)})
    model = ct_model.build_model(config, seed=1).eval()
    with torch.no_grad():  # norms away from ones, so that a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    out = export(model, tokenizer, tmp_path / "hf", arch=arch)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    replaced = replace_like_bitnet(hf_model)
    counts = {}
    for name in replaced:
        layer = int(name.split("layers.")[1].split(".")[0])
        counts[layer] = counts.get(layer, 0) + 1
    assert counts == per_layer, replaced
    assert not any("embed_tokens" in n or "lm_head" in n for n in replaced)

    enc = hf_tok(["Janet has 3 ducks and 7 cows.", "The cat sat on the mat!!"], return_tensors="pt", padding=True)
    ids = enc["input_ids"][:, :8]
    UserLinear.calls = 0
    with torch.no_grad():
        theirs = hf_model(input_ids=ids).logits
        ours = model(ids)
    assert UserLinear.calls == len(replaced)  # the replaced layers are those the forward runs
    assert (theirs - ours).abs().max().item() <= TOL

"""Layout-independent initialisation (ct_model.init) and lazy weight sources (ct_model.weights,
ct_model.hf.HFWeights): any slice equals the same rows of the whole tensor, and values depend only
on (seed, name, position)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import ct_model
from ct_model import init as init_mod
from ct_model.hf import HFWeights
from ct_model.weights import load_into


def tiny(**overrides):
    values = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)
    return ct_model.presets.get("mobilellm_tiny", **{**values, **overrides})


def test_any_row_slice_equals_those_rows_of_the_whole_tensor(monkeypatch):
    monkeypatch.setattr(init_mod, "BLOCK_ELEMENTS", 3 * 64)  # 3 rows a block: slices cross blocks
    rule = init_mod.InitRule("normal", 0.02)
    whole = init_mod.init_rows(rule, "layers.0.mlp.up_proj.weight", (128, 64), seed=5)
    assert abs(float(whole.std()) - 0.02) < 0.002
    for start, stop in [(0, 1), (2, 7), (3, 6), (64, 128), (127, 128), (5, 5)]:
        part = init_mod.init_rows(rule, "layers.0.mlp.up_proj.weight", (128, 64), 5, start, stop)
        assert torch.equal(part, whole[start:stop]), (start, stop)
    other = init_mod.init_rows(rule, "layers.0.mlp.down_proj.weight", (128, 64), seed=5)
    assert not torch.equal(other, whole)  # each parameter its own stream
    assert not torch.equal(init_mod.init_rows(rule, "layers.0.mlp.up_proj.weight", (128, 64), seed=6), whole)


def test_values_depend_on_the_seed_and_the_name_only():
    """A deeper model, or one built on meta and filled later, has the same values under the same
    names: nothing depends on the order in which parameters are drawn."""
    shallow, deep = ct_model.build_model(tiny(), seed=3), ct_model.build_model(tiny(num_layers=4), seed=3)
    deep_state = deep.state_dict()
    for name, value in shallow.state_dict().items():
        assert torch.equal(value, deep_state[name]), name
    late = ct_model.build_model(tiny(), device="meta")
    late.to_empty(device="cpu")
    load_into(late, init_mod.SeededInit(late, 3))
    for name, value in shallow.state_dict().items():
        assert torch.equal(value, late.state_dict()[name]), name
    norms = [v for k, v in shallow.state_dict().items() if k.endswith("layernorm.weight")]
    assert norms and all(bool((v == 1).all()) for v in norms)


def test_hf_weights_read_rows_of_sharded_files(tmp_path):
    """An export split into two files with an index reads back whole and by rows."""
    model = ct_model.build_model(tiny(share_embeddings_and_output_weights=False), seed=1)
    one = ct_model.hf.save_hf(model, tmp_path / "one")
    tensors = {}
    with __import__("safetensors").safe_open(str(one / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    two = tmp_path / "two"
    two.mkdir()
    (two / "config.json").write_text((one / "config.json").read_text())
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, names in halves.items():
        save_file({k: tensors[k] for k in names}, str(two / file))
    weight_map = {k: file for file, names in halves.items() for k in names}
    (two / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    weights = HFWeights(two)
    state = model.state_dict()
    assert sorted(weights.names()) == sorted(state)
    for name, value in state.items():
        assert weights.shape(name) == tuple(value.shape)
        assert torch.equal(weights.full(name), value), name
    assert torch.equal(weights.rows("lm_head.weight", 10, 20), state["lm_head.weight"][10:20])
    loaded, _ = ct_model.hf.load_hf(two, dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, state["lm_head.weight"].to(torch.bfloat16))


def test_a_missing_tensor_is_named(tmp_path):
    model = ct_model.build_model(tiny(), seed=1)
    out = ct_model.hf.save_hf(model, tmp_path / "m")
    with __import__("safetensors").safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ct_model.UserError, match="missing.*norm.weight"):
        ct_model.hf.load_hf(out)

"""The streaming HF writer (``ct_model.hf.write_hf``): sharded exports in transformers' layout load
in transformers with ct-model's logits and read back exactly; the writer holds at most one shard;
an interrupted or incomplete export never looks complete."""

import json
import weakref

import pytest
import torch
from safetensors import safe_open

import ct_model
from ct_model import presets
from ct_model.hf import HFFormatError, HFWeights, load_hf, save_hf, write_hf
from ct_model.safetensors_shards import DEFAULT_MAX_SHARD_BYTES
from ct_model.moe import Router

transformers = pytest.importorskip("transformers")

TOL = 1e-4
MAX_SHARD = 40_000  # bytes: the tiny models below are ~0.3-1.6 MB, so 8 to 40 shards


def llama4_model():
    config = presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=4,
                         num_query_groups=2, ffn_hidden_size=96, vocab_size=101)
    return ct_model.build_model(config, seed=1).eval()


def llama_permuted_model():
    # interleaved RoPE written as rotate-half Llama: q/k rows permuted on the way; layer sharing
    # writes each block twice; untied output layer.
    config = presets.get("mobilellm_tiny", num_layers=2, hidden_size=64, num_attention_heads=4,
                         num_query_groups=2, ffn_hidden_size=96, vocab_size=101, qk_layernorm=False,
                         layer_sharing=True, share_embeddings_and_output_weights=False)
    return ct_model.build_model(config, seed=2).eval()


def deepseek_model():
    config = presets.get("deepseek_v3_tiny", vocab_size=103, hidden_size=64, ffn_hidden_size=80,
                         moe_ffn_hidden_size=16, moe_shared_expert_intermediate_size=32, kv_lora_rank=24,
                         q_lora_rank=40, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12, num_layers=3,
                         rotary_base=700.0)
    model = ct_model.build_model(config, seed=3).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Router):
                m.weight.normal_(0, 0.3, generator=g)
                m.expert_bias.normal_(0, 0.1, generator=g)
    return model


CASES = {"llama4": (llama4_model, "llama4"), "llama_permuted_shared": (llama_permuted_model, "llama"),
         "deepseek_v3": (deepseek_model, "deepseek_v3")}


def randomise_norms(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
    return model


def file_tensors(root, name):
    with safe_open(str(root / name), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_export_loads_in_transformers_and_reads_back_exactly(tmp_path, case):
    make, arch = CASES[case]
    model = randomise_norms(make())
    out = tmp_path / "sharded"
    write_hf(((k, v) for k, v in model.state_dict().items()), model.config, out, arch=arch,
             max_shard_bytes=MAX_SHARD)
    # transformers' layout: N shards named i-of-N, an index naming every tensor's file.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(files)
    assert n > 3 and not (out / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not list(out.glob("*.tmp"))
    tensors = {}
    for name in files:
        shard = file_tensors(out, name)
        assert all(index["weight_map"][k] == name for k in shard)
        size = sum(t.numel() * t.element_size() for t in shard.values())
        assert size <= MAX_SHARD or len(shard) == 1, (name, size)  # one oversized tensor: a shard alone
        tensors.update(shard)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # The same tensors as the one-file export (the default shard size holds this model whole).
    single = tmp_path / "single"
    save_hf(model, single, arch=arch)
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    whole = file_tensors(single, "model.safetensors")
    assert set(whole) == set(tensors) and all(torch.equal(whole[k], tensors[k]) for k in whole)
    # transformers loads it with our logits...
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert (model(ids) - theirs(input_ids=ids).logits).abs().max().item() <= TOL
    # ...and our lazy reader and loader read it back: bit for bit where the layout is ours
    # (llama4, deepseek_v3), as the same function where it was converted (permuted, shared blocks).
    again, _ = load_hf(out)
    if case == "llama_permuted_shared":
        with torch.no_grad():
            assert (model(ids) - again(ids)).abs().max().item() <= TOL
        return
    weights = HFWeights(out)
    assert sorted(weights.names()) == sorted(model.state_dict())
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
        assert torch.equal(weights.full(name), a), name


@pytest.mark.parametrize("shards", ["many", "one"])
def test_writer_holds_no_tensor_once_it_asks_for_the_next(tmp_path, shards):
    """Every tensor handed to the writer is a fresh copy in memory watched through a weak reference
    (a numpy array the tensor's storage keeps alive, however many tensor objects share it); when
    the writer asks for the next one, no copy is still alive: it wrote each to disk as it came,
    whether the model spans many shards or fits the default single file."""
    model = llama4_model()  # llama4 from interleaved RoPE: no tensor is converted, so none copied
    state = model.state_dict()
    model_bytes = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    max_shard = 2 * largest if shards == "many" else DEFAULT_MAX_SHARD_BYTES
    alive: list[weakref.ref] = []
    peak = 0

    def items():
        nonlocal peak
        for name, value in state.items():
            peak = max(peak, sum(r().nbytes for r in alive if r() is not None))
            memory = value.detach().numpy().copy()
            alive.append(weakref.ref(memory))
            copy = torch.from_numpy(memory)
            del memory
            yield name, copy
            del copy

    write_hf(items(), model.config, tmp_path, max_shard_bytes=max_shard)
    files = list(tmp_path.glob("model*.safetensors"))
    assert len(files) >= 4 if shards == "many" else [f.name for f in files] == ["model.safetensors"]
    assert len(alive) == len(state) and peak == 0, (peak, model_bytes)
    weights = HFWeights(tmp_path)  # read back through safetensors' own reader
    assert all(torch.equal(weights.full(name), value) for name, value in state.items())


def test_interrupted_or_incomplete_export_never_looks_complete(tmp_path):
    model = deepseek_model()
    save_hf(model, tmp_path, max_shard_bytes=MAX_SHARD)  # a complete export is there first
    state = list(model.state_dict().items())

    def interrupted():
        yield from state[: len(state) // 2]
        raise RuntimeError("rank died")

    with pytest.raises(RuntimeError, match="rank died"):
        write_hf(interrupted(), model.config, tmp_path, max_shard_bytes=MAX_SHARD)
    assert not (tmp_path / "config.json").exists()
    assert not list(tmp_path.glob("*.safetensors*"))  # neither stale nor partial weights
    # A source that stops early is refused naming what is missing, and leaves nothing complete.
    with pytest.raises(HFFormatError, match="never arrived.*layers.2"):
        write_hf(iter(state[:-3]), model.config, tmp_path, max_shard_bytes=MAX_SHARD)
    assert not (tmp_path / "config.json").exists() and not list(tmp_path.glob("*.safetensors*"))
    with pytest.raises(HFFormatError, match="arrived twice"):
        write_hf(iter(state + state[:1]), model.config, tmp_path)
    # After all that, a one-file export into the same directory stands alone and loads.
    save_hf(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    again, _ = load_hf(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

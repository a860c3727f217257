"""Activation checkpointing: validation, gradients equal to no checkpointing, unchanged names, and
what selective checkpointing recomputes (ops counted in backward with a TorchDispatchMode)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.utils._python_dispatch import TorchDispatchMode

from ct_model import build_model, generate, presets
from ct_model.hf import load_hf, save_hf
from ct_precision import ActivationCheckpointConfig, apply_activation_checkpointing
from ct_precision.checkpointing import is_checkpointed


def tiny(**overrides):
    values = dict(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                  ffn_hidden_size=128, vocab_size=256, max_position_embeddings=64)
    return presets.get("mobilellm_tiny", **{**values, **overrides})


def batch(config, b=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (b, t + 1), generator=g)
    doc = torch.zeros(b, t, dtype=torch.long)
    doc[:, 6:] = 1  # two packed documents: the dense-mask SDPA path
    pos = torch.arange(t).expand(b, t).clone()
    pos[:, 6:] -= 6
    return ids[:, :-1], ids[:, 1:], pos, doc


def loss_and_grads(config, mode, every=1, seed=0):
    model = build_model(config, seed=seed)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode, every_n_blocks=every))
    ids, labels, pos, doc = batch(config)
    loss = F.cross_entropy(model(ids, pos, doc).flatten(0, 1), labels.flatten())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("bad, needle", [
    (dict(mode="partial"), "activation_checkpointing.mode must be one of"),
    (dict(mode="full", every_n_blocks=0), "activation_checkpointing.every_n_blocks"),
    (dict(mode="full", every_n_blocks=1.5), "activation_checkpointing.every_n_blocks"),
    (dict(mode="full", every_n_blocks=True), "activation_checkpointing.every_n_blocks"),
])
def test_config_errors_name_the_field(bad, needle):
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        ActivationCheckpointConfig(**bad)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="every_n_layers"):
        ActivationCheckpointConfig.from_dict({"mode": "full", "every_n_layers": 2})


@pytest.mark.parametrize("mode, every", [("full", 1), ("selective", 1), ("full", 2), ("selective", 2)])
def test_gradients_equal_no_checkpointing(mode, every):
    config = tiny()
    want_loss, want = loss_and_grads(config, "none")
    loss, got = loss_and_grads(config, mode, every)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_gradients_equal_with_layer_sharing():
    # Each shared block runs twice per forward: two checkpointed calls of one module.
    config = tiny(layer_sharing=True, num_layers=2)
    _, want = loss_and_grads(config, "none")
    for mode in ("full", "selective"):
        _, got = loss_and_grads(config, mode)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=(mode, k))


def test_every_n_blocks_picks_blocks_0_n_2n():
    model = build_model(tiny(num_layers=5), seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="full", every_n_blocks=2))
    assert [is_checkpointed(b) for b in model.layers] == ["full", None, "full", None, "full"]
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="selective"))


def test_parameter_names_state_dict_and_hf_export_unchanged(tmp_path):
    config = tiny()
    plain = build_model(config, seed=0)
    model = build_model(config, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="selective"))
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert list(get_model_state_dict(model)) == list(get_model_state_dict(plain))  # what DCP saves
    # A plain model loads the checkpointed model's state dict strictly, and the HF export reloads.
    plain.load_state_dict(model.state_dict(), strict=True)
    reloaded = load_hf(save_hf(model, tmp_path / "hf"))
    reloaded = reloaded[0] if isinstance(reloaded, tuple) else reloaded
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v, rtol=0, atol=0)


def test_generation_with_kv_cache_is_unchanged():
    # No grad: the block runs plainly (a recompute would append to the KV cache twice).
    config = tiny()
    plain = build_model(config, seed=0)
    model = build_model(config, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode="full"))
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert generate(model, prompts, 6) == generate(plain, prompts, 6)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def backward_op_counts(config, mode):
    model = build_model(config, seed=0)
    apply_activation_checkpointing(model, ActivationCheckpointConfig(mode=mode))
    ids, labels, pos, doc = batch(config)
    loss = F.cross_entropy(model(ids, pos, doc).flatten(0, 1), labels.flatten())
    with OpCounter() as counter:
        loss.backward()
    return counter.counts


def test_selective_recomputes_elementwise_ops_but_no_matmul_or_attention():
    config = tiny()
    none, full, selective = (backward_op_counts(config, m) for m in ("none", "full", "selective"))
    attention = "_scaled_dot_product_flash_attention_for_cpu"
    layers = config.num_layers
    # Without checkpointing backward runs no forward op. Full recomputes each block's forward:
    # its matmuls (q, k, v, o, gate, up; down_proj's output is not needed by backward, and the
    # recompute stops early before it), its attention and its SiLU.
    assert none["silu"] == 0 and none[attention] == 0
    assert full["mm"] >= none["mm"] + 6 * layers
    assert full[attention] == layers and full["silu"] == layers
    # Selective: matmul and attention outputs were saved (backward runs exactly the no-AC
    # matmuls), the SiLU is recomputed.
    assert selective["mm"] == none["mm"] and selective[attention] == 0
    assert selective["silu"] == layers

"""The DeepSeek-V3 decoder (MLA + MoE blocks): structure, counts, masking, cache, aux loss."""

import pytest
import torch

import ct_model
from ct_model import presets
from ct_model.layers import SwiGLU
from ct_model.mla import MLAttention
from ct_model.moe import MoE, sequence_balance_loss, take_aux_loss


def small(**overrides):
    return presets.get("deepseek_v3_tiny", **{"vocab_size": 97, "hidden_size": 64, "ffn_hidden_size": 96,
                                              "moe_ffn_hidden_size": 32,
                                              "moe_shared_expert_intermediate_size": 32, **overrides})


def test_tiny_blocks_and_parameter_count_equal_the_config():
    c = presets.get("deepseek_v3_tiny")
    model = ct_model.build_model(c, seed=0)
    assert ct_model.count_parameters(model) == ct_model.count_parameters(c) == 7_897_984
    assert [type(b.mlp) for b in model.layers] == [SwiGLU, MoE, MoE, MoE]
    assert all(isinstance(b.self_attn, MLAttention) for b in model.layers)
    # The bias is in the state dict (checkpointed), the load counter is not.
    keys = set(model.state_dict())
    assert "layers.1.mlp.gate.expert_bias" in keys and "layers.1.mlp.gate.load" not in keys


def test_meta_build_then_init_equals_a_direct_build():
    c = small()
    direct = ct_model.build_model(c, seed=3)
    late = ct_model.build_model(c, device="meta")
    late.to_empty(device="cpu")
    late.init_weights(3)
    for (name, a), b in zip(direct.state_dict().items(), late.state_dict().values()):
        assert torch.equal(a, b), name
    filled, _, _ = ct_model.model_from_state(c, direct.state_dict())
    assert all(float(m.gate.load.abs().sum()) == 0 for m in filled.modules() if isinstance(m, MoE))


def test_moe_packed_documents_match_running_each_alone():
    model = ct_model.build_model(small(), seed=1).eval()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    position_ids = torch.cat((torch.arange(7), torch.arange(5)))[None]
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(torch.cat((a, b), 1), position_ids, document_ids)
        torch.testing.assert_close(out[:, :7], model(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[:, 7:], model(b), atol=1e-5, rtol=1e-5)


def test_moe_kv_cache_generation_equals_full_forward():
    model = ct_model.build_model(small(), seed=5).eval()
    prompts = [[5, 9, 11, 2], [7, 3]]
    new = ct_model.generate(model, prompts, max_new_tokens=5)
    for prompt, got in zip(prompts, new):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(5):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert got == seq[len(prompt):]


def test_sequence_balance_loss_by_hand():
    torch.manual_seed(0)
    rows, t, e, k = 2, 5, 4, 2
    scores = torch.rand(rows * t, e)
    indices = scores.topk(k, dim=-1).indices
    expected = 0.0
    for r in range(rows):
        s, idx = scores[r * t:(r + 1) * t], indices[r * t:(r + 1) * t]
        total = 0.0
        for i in range(e):
            f_i = e / (k * t) * sum(int(i in row.tolist()) for row in idx)
            p_i = sum(float(s[j, i] / s[j].sum()) for j in range(t)) / t
            total += f_i * p_i
        expected += total / rows
    assert float(sequence_balance_loss(scores, indices, rows)) == pytest.approx(expected, rel=1e-6)


def test_aux_loss_is_recorded_in_training_only_and_reaches_the_router():
    model = ct_model.build_model(small(moe_aux_loss_coeff=0.01), seed=2)
    ids = torch.randint(0, 97, (2, 8))
    model.eval()
    model(ids)
    assert take_aux_loss(model) is None
    model.train()
    model(ids)
    aux = take_aux_loss(model)
    assert take_aux_loss(model) is None  # taken once
    # Three MoE layers, each 0.01 x a term that is 1 for perfectly balanced routing.
    assert 0.03 * 0.9 < float(aux) < 0.03 * 4
    aux.backward()
    assert model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    plain = ct_model.build_model(small(), seed=2).train()
    plain(ids)
    assert take_aux_loss(plain) is None  # coefficient 0: nothing recorded

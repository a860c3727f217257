import pytest
import torch

import ct_model
from ct_model import presets


def tiny(**overrides):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96, vocab_size=97)
    return presets.get("mobilellm_tiny", **{**base, **overrides})


@pytest.mark.parametrize("style", ["interleaved", "rotate_half"])
def test_packed_documents_match_running_each_alone(style):
    torch.manual_seed(0)
    model = ct_model.build_model(tiny(rope_style=style), seed=1).eval()
    a = torch.randint(0, 97, (1, 7))
    b = torch.randint(0, 97, (1, 5))
    packed = torch.cat((a, b), dim=1)
    position_ids = torch.cat((torch.arange(7), torch.arange(5)))[None]
    document_ids = torch.tensor([[0] * 7 + [1] * 5])
    with torch.no_grad():
        out = model(packed, position_ids, document_ids)
        alone_a, alone_b = model(a), model(b)
        crossed = model(packed)  # without the mask, doc b sees doc a
    torch.testing.assert_close(out[:, :7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 7:], alone_b, atol=1e-5, rtol=1e-5)
    assert (crossed[:, 7:] - alone_b).abs().max() > 1e-3


def test_rope_styles_are_a_row_permutation_of_each_other():
    # Interleaved RoPE on weights W equals rotate-half RoPE on per-head row-permuted q/k weights.
    from ct_model.hf_llama import _interleaved_to_rotate_half, _permute_heads

    inter = ct_model.build_model(tiny(rope_style="interleaved"), seed=3).eval()
    half = ct_model.build_model(tiny(rope_style="rotate_half"), seed=4).eval()
    state = inter.state_dict()
    order = _interleaved_to_rotate_half(inter.config.kv_channels)
    for key in list(state):
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            state[key] = _permute_heads(state[key], inter.config.kv_channels, order)
    half.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(inter(ids), half(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", [False, True])
def test_kv_cache_generation_equals_full_forward(sharing):
    model = ct_model.build_model(tiny(layer_sharing=sharing), seed=5).eval()
    prompt = [5, 9, 11, 2]
    new = ct_model.generate(model, [prompt], max_new_tokens=6)[0]
    # Reference: greedy decoding with a full forward over the whole sequence at every step.
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert new == seq[len(prompt):]


def test_batched_left_padded_generation_equals_each_alone():
    model = ct_model.build_model(tiny(), seed=6).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9]]
    batched = ct_model.generate(model, prompts, max_new_tokens=5)
    alone = [ct_model.generate(model, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone


def test_generation_stops_at_eos_and_sampling_is_seeded():
    model = ct_model.build_model(tiny(), seed=7).eval()
    greedy = ct_model.generate(model, [[3, 4]], max_new_tokens=8)[0]
    stopped = ct_model.generate(model, [[3, 4]], max_new_tokens=8, eos_ids={greedy[2]})[0]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s1 = ct_model.generate(model, [[3, 4]], 8, temperature=1.0, top_p=0.9, generator=g())
    s2 = ct_model.generate(model, [[3, 4]], 8, temperature=1.0, top_p=0.9, generator=g())
    assert s1 == s2


def test_top_p_tiny_keeps_only_the_argmax():
    model = ct_model.build_model(tiny(), seed=8).eval()
    greedy = ct_model.generate(model, [[3, 4]], max_new_tokens=6)
    nucleus = ct_model.generate(model, [[3, 4]], 6, temperature=1.0, top_p=1e-6,
                                generator=torch.Generator().manual_seed(1))
    assert nucleus == greedy


def test_untied_model_has_separate_head_and_grads_flow():
    model = ct_model.build_model(tiny(share_embeddings_and_output_weights=False), seed=9)
    assert model.lm_head is not None
    model(torch.randint(0, 97, (1, 4))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

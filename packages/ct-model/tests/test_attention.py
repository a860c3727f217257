"""Attention backends for packed documents, against the dense-mask SDPA path and hand-built masks."""

import pytest
import torch
from tensor_probe import LargestTensor

import ct_model
from ct_model import presets
from ct_model.attention import DENSE_MASK_MAX_TOKENS, attend, build_mask_info, cu_seqlens_from_document_ids
from ct_model.config import ConfigError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny(**overrides):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=96, vocab_size=97)
    return presets.get("mobilellm_tiny", **{**base, **overrides})


def hand_mask(doc_row):
    """Token-level mask by explicit loops: i sees j when j <= i and both share a document."""
    t = len(doc_row)
    return [[j <= i and doc_row[i] == doc_row[j] for j in range(t)] for i in range(t)]


def test_config_rejects_unknown_backend_naming_the_field():
    with pytest.raises(ConfigError, match="attention_backend"):
        tiny(attention_backend="flash9")


def test_cu_seqlens_match_hand_built():
    docs = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 2, 2, 2]])
    cu, longest = cu_seqlens_from_document_ids(docs)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 5, 7, 10]  # row 1's doc 0 is a new sequence, not row 0's doc 0
    assert longest == 3


@pytest.mark.slow  # first flex import + block-mask build: ~15 s on 2 cores
def test_block_mask_matches_hand_built_blocks():
    rows = [[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]]
    docs = torch.tensor(rows)
    from torch.nn.attention.flex_attention import create_block_mask
    from ct_model.attention import document_causal

    block = create_block_mask(document_causal(docs), 2, None, 8, 8, device="cpu", BLOCK_SIZE=2)
    dense_blocks = block.to_dense()[:, 0].bool()  # [B, 4, 4]: block (qi, kj) has any allowed pair
    for b, row in enumerate(rows):
        tok = hand_mask(row)
        want = [[any(tok[i][j] for i in range(2 * qi, 2 * qi + 2) for j in range(2 * kj, 2 * kj + 2))
                 for kj in range(4)] for qi in range(4)]
        assert dense_blocks[b].tolist() == want
    # The token-level predicate the block mask evaluates inside partial blocks:
    pred = document_causal(docs)
    for b, row in enumerate(rows):
        i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        assert pred(torch.tensor(b), 0, i, j).tolist() == hand_mask(row)


def test_auto_picks_plain_causal_for_single_document_rows_and_dense_on_cpu():
    assert build_mask_info(torch.zeros(2, 6, dtype=torch.long)).backend == "causal"
    multi = build_mask_info(torch.tensor([[0, 0, 1, 1]]))
    assert multi.backend == "sdpa" and multi.dense[0, 0].tolist() == hand_mask([0, 0, 1, 1])


def test_auto_on_cpu_switches_to_varlen_past_the_dense_mask_limit():
    t = DENSE_MASK_MAX_TOKENS
    at_limit = build_mask_info((torch.arange(t) // 1000)[None])
    assert at_limit.backend == "sdpa"
    past = build_mask_info((torch.arange(t + 8) // 1000)[None])
    assert past.backend == "varlen" and past.dense is None
    ends = [min(1000 * (i + 1), t + 8) for i in range(5)]
    assert past.segments == tuple(zip([0, *ends[:-1]], ends))


def test_cpu_varlen_segments_follow_cu_seqlens():
    info = build_mask_info(torch.tensor([[0, 0, 0, 1, 1], [0, 0, 2, 2, 2]]), "varlen")
    assert info.segments == ((0, 3), (3, 5), (5, 7), (7, 10))


@pytest.mark.parametrize("value_dim", [32, 24])  # 24: MLA's narrower values
def test_cpu_varlen_forward_and_backward_equal_the_dense_path(value_dim):
    docs = torch.tensor([[0] * 100 + [1] * 156, [0] * 30 + [1] * 200 + [2] * 26])
    grads = {}
    for name in ("sdpa", "varlen"):
        q, k, v = _qkv("cpu")
        v = v[..., :value_dim].detach().requires_grad_()
        out = attend(q, k, v, build_mask_info(docs, name))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = (out.detach(), q.grad, k.grad, v.grad)
    for want, got in zip(grads["sdpa"], grads["varlen"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cpu_varlen_model_equals_the_dense_model():
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
    pos = torch.cat([torch.cat([torch.arange(n) for n in lens]) for lens in ([5, 7, 4], [9, 7])]).view(2, 16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    dense = ct_model.build_model(tiny(attention_backend="sdpa"), seed=1)
    varlen = ct_model.build_model(tiny(attention_backend="varlen"), seed=1)
    want, got = dense(ids, pos, docs), varlen(ids, pos, docs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.square().mean().backward()
    got.square().mean().backward()
    for (name, a), b in zip(dense.named_parameters(), varlen.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cpu_32k_step_allocates_no_t_by_t_tensor():
    """The reasoning phase's 32,768-token rows on CPU: auto resolves to varlen, forward and
    backward stay far below one T x T tensor (1.07e9 elements) while the dense path needs it."""
    t = 32_768
    model = ct_model.build_model(tiny(num_layers=1), seed=1)
    docs = (torch.arange(t) // 4096)[None]
    pos = torch.arange(t)[None] % 4096
    ids = torch.randint(0, 97, (1, t), generator=torch.Generator().manual_seed(0))
    with LargestTensor() as mode:
        model.hidden_states(ids, pos, docs).square().mean().backward()
    assert mode.largest <= t * 64 * 4, mode.largest  # [T, hidden] activations and their like
    two_docs = (torch.arange(DENSE_MASK_MAX_TOKENS) // 2048)[None]
    assert build_mask_info(two_docs).dense.numel() == DENSE_MASK_MAX_TOKENS ** 2  # what the limit costs


@pytest.mark.slow
def test_flex_forward_equals_dense_path_on_cpu():
    torch.manual_seed(0)
    docs = torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 9 + [1] * 7])
    pos = torch.cat([torch.cat([torch.arange(n) for n in lens]) for lens in ([5, 7, 4], [9, 7])]).view(2, 16)
    ids = torch.randint(0, 97, (2, 16))
    dense = ct_model.build_model(tiny(attention_backend="sdpa"), seed=1).eval()
    flex = ct_model.build_model(tiny(attention_backend="flex"), seed=1).eval()
    with torch.no_grad():
        want, got = dense(ids, pos, docs), flex(ids, pos, docs)
        auto = ct_model.build_model(tiny(), seed=1).eval()(ids, pos, docs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(auto, want, atol=0, rtol=0)


def _qkv(device, t=256, requires_grad=True):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda h: torch.randn(2, h, t, 32, generator=g).to(device).requires_grad_(requires_grad)  # noqa: E731
    return mk(4), mk(2), mk(2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_gpu_backward_equals_dense_path(backend):
    docs = torch.tensor([[0] * 100 + [1] * 156, [0] * 30 + [1] * 200 + [2] * 26], device="cuda")
    grads = {}
    for name in ("sdpa", backend):
        q, k, v = _qkv("cuda")
        out = attend(q, k, v, build_mask_info(docs, name))
        out.square().sum().backward()
        grads[name] = (out.detach(), q.grad, k.grad, v.grad)
    for want, got in zip(grads["sdpa"], grads[backend]):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)




@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_gpu_no_t_by_t_tensor_in_a_32k_step(backend):
    t = 32_768
    model = ct_model.build_model(tiny(attention_backend=backend), seed=1).cuda()
    docs = (torch.arange(t, device="cuda") // 5000)[None]
    ids = torch.randint(0, 97, (1, t), device="cuda")
    with LargestTensor() as mode:
        model.hidden_states(ids, None, docs).float().square().mean().backward()
    assert mode.largest < t * t // 64, mode.largest  # a T x T row would be 1.07e9 elements

"""Packed documents as megatron THD: cu_seqlens from document ids against hand-built ones, the
flattening round trip, why the local spec keeps the dense mask, the engine's THD path under the
CPU shim (a test-only THD attention), and, on a GPU with Transformer Engine, TE's THD attention
against the dense-mask path and ct-model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import parallel_testlib as lib  # noqa: E402
from ct_parallel.megatron.packed import (cu_seqlens_from_starts, flatten_rows, packed_seq_params,  # noqa: E402
                                         segment_starts, unflatten_rows)


def cu(mb: dict) -> list[int]:
    params = packed_seq_params(mb)
    assert params.qkv_format == "thd" and params.cu_seqlens_q is params.cu_seqlens_kv
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == params.max_seqlen_kv
    return params.cu_seqlens_q.tolist()


def t(rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("doc, want, longest", [
    # two rows: three documents, then one document followed by ct_data's padding (id -1)
    ([[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, -1, -1]], [0, 3, 5, 8, 14, 16], 6),
    # a document id owning no token (1): no empty segment
    ([[0, 0, 2, 2, 2, -1, -1, -1]], [0, 2, 5, 8], 3),
    # equal ids on both sides of a row boundary stay two segments (rows never attend to each other)
    ([[0, 0, 1, 1], [1, 1, 1, 1]], [0, 2, 4, 8], 4),
    # one document per row, three rows
    ([[0, 0, 0, 0], [0, 0, 0, 0], [5, 5, 5, 5]], [0, 4, 8, 12], 4),
    # a row that is all padding, then single-token documents
    ([[-1, -1, -1], [0, 1, 2]], [0, 3, 4, 5, 6], 3),
])
def test_cu_seqlens_from_document_ids_equal_hand_built(doc, want, longest):
    doc = t(doc)
    mb = {"input_ids": torch.zeros_like(doc), "document_ids": doc}
    assert cu(mb) == want
    assert packed_seq_params(mb).max_seqlen_q == longest


def test_without_document_ids_position_zero_starts_a_document():
    # row 0 begins with a document continued from the previous sequence (positions 3, 4)
    pos = t([[3, 4, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]])
    assert cu({"input_ids": torch.zeros_like(pos), "position_ids": pos}) == [0, 2, 5, 8, 12, 14, 16]
    # document ids win over positions (a continued document's positions do not restart)
    doc = t([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert cu({"input_ids": torch.zeros_like(pos), "position_ids": pos, "document_ids": doc}) == [0, 5, 8, 16]
    # neither: one document per row
    assert cu({"input_ids": torch.zeros(3, 5, dtype=torch.long)}) == [0, 5, 10, 15]


def test_segments_reproduce_the_dense_document_mask():
    """Tokens i, j of the flattened row share a cu_seqlens segment exactly when ct-model's dense
    mask lets the later attend to the earlier (same row, same document): the two paths mask alike."""
    from ct_model.masking import document_causal_mask

    doc = t([[0, 0, 1, 1, 1, 3, -1, -1], [0, 1, 1, 1, 1, 1, 1, 2]])
    b, n = doc.shape
    bounds = cu_seqlens_from_starts(segment_starts(doc)).tolist()
    seg = torch.zeros(b * n, dtype=torch.long)
    for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[s:e] = k
    same = seg[:, None] == seg[None, :]
    causal = torch.ones(b * n, b * n, dtype=torch.bool).tril()
    dense = torch.zeros(b * n, b * n, dtype=torch.bool)
    for r in range(b):
        dense[r * n:(r + 1) * n, r * n:(r + 1) * n] = document_causal_mask(doc[r:r + 1])[0, 0]
    assert torch.equal(same & causal, dense)


def test_flatten_unflatten_round_trip():
    x = torch.randn(3, 5, 7)
    flat = flatten_rows(x)
    assert flat.shape == (1, 15, 7)
    assert torch.equal(flat[0, 5:10], x[1])  # row-major: row r occupies [r*T, (r+1)*T)
    assert torch.equal(unflatten_rows(flat, 3), x)
    ids = torch.arange(12).reshape(4, 3)
    assert torch.equal(unflatten_rows(flatten_rows(ids), 4), ids)
    with pytest.raises(ValueError, match="unflatten"):
        unflatten_rows(flat, 4)


def test_engine_inputs_flatten_only_on_the_thd_path():
    from ct_parallel.megatron.engine import model_inputs, model_logits

    mb = lib.global_batch(lib.tiny_config(), n_micro=1, b=2, t=8)[0]
    (ids, pos, mask), kwargs = model_inputs(mb, thd=False)
    assert ids.shape == (2, 8) and mask.shape == (2, 1, 8, 8) and kwargs == {}
    (ids, pos, mask), kwargs = model_inputs(mb, thd=True)
    assert ids.shape == (1, 16) and mask is None and torch.equal(pos[0, 8:], mb["position_ids"][1])
    assert kwargs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 5, 8, 13, 16]  # cut at 5 in both rows
    logits = torch.randn(1, 16, 11)
    assert torch.equal(model_logits(logits, 2, thd=True), logits.reshape(2, 8, 11))


def test_local_attention_refuses_thd_which_is_why_the_dense_mask_remains():
    """megatron's local DotProductAttention asserts packed_seq_params is None before anything else
    (the reason the engine keeps the dense mask with the local spec); and the engine only picks THD
    with Transformer Engine."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from types import SimpleNamespace

    from ct_parallel.megatron.engine import MegatronEngine

    q = torch.zeros(4, 2, 8)
    mb = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(AssertionError, match="Packed sequence is not supported"):
        DotProductAttention.forward(None, q, q, q, None, packed_seq_params=packed_seq_params(mb))
    thd = MegatronEngine.thd.fget
    assert thd(SimpleNamespace(te=True)) and not thd(SimpleNamespace(te=False))


@pytest.mark.dist
@pytest.mark.slow
def test_megatron_thd_path_matches_single_process(tmp_path):
    """The engine's THD path (flattened row, cu_seqlens, THD RoPE, pipeline shapes, unflattened
    logits) at DP=2, PP=2 and TP=2+SP on the CPU shim, with a test-only per-segment attention:
    losses at 3 steps, step-0 gradients and weights after 3 AdamW steps equal the single-process
    ct-model with its dense document mask (fp32, 1e-5), on batches with continued documents,
    padding and single-document rows."""
    out = tmp_path / "thd.json"
    lib.torchrun("dist_megatron_thd_checks.py", str(out), shim=True)
    results = json.loads(out.read_text())
    assert set(results) == {"dp2", "pp2", "tp2_sp"}
    for name, r in results.items():
        assert r["loss"] <= lib.TOL and r["grad"] <= lib.TOL and r["param"] <= lib.PARAM_TOL, (name, r)


# ------------------------------------------------------------------------------------------ GPU


def _te_on_cuda() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _te_on_cuda(), reason="needs CUDA and Transformer Engine")
def test_te_thd_forward_matches_the_dense_mask_path_and_ct_model():
    """Transformer Engine's attention: THD (cu_seqlens, causal per segment) against the same TE
    spec with the dense document mask (mask type 'arbitrary') and against ct-model's forward, in
    bf16 (TE's fused kernels do not run fp32), on packed rows with padding."""
    from dist_megatron_thd_checks import packed_batch

    from ct_model import build_model
    from ct_parallel import DistributedConfig, init_distributed
    from ct_parallel.megatron import bridge
    from ct_parallel.megatron.engine import model_inputs, model_logits
    from ct_parallel.megatron.model import build_gpt_chunks, transformer_config

    dcfg = DistributedConfig(engine="megatron", transformer_impl="transformer_engine")
    init_distributed(dcfg)
    config = lib.tiny_config()
    ct = build_model(config, seed=0)
    state = {k: v.float() for k, v in ct.state_dict().items()}
    tconfig = transformer_config(config, dcfg, bf16=True)
    models = {}
    for thd in (True, False):
        (chunk,) = build_gpt_chunks(config, tconfig, te=True, thd=thd)
        bridge.load_ct_state_dict([chunk], state, config)
        models[thd] = chunk.cuda().bfloat16().eval()
    ct = ct.cuda().bfloat16().eval()
    for mb in packed_batch(config):
        mb = {k: v.cuda() for k, v in mb.items()}
        b = mb["input_ids"].shape[0]
        with torch.no_grad():
            got = {}
            for thd, model in models.items():
                args, kwargs = model_inputs(mb, thd)
                got[thd] = model_logits(model(*args, **kwargs), b, thd).float()
            want = ct(mb["input_ids"], mb["position_ids"], mb["document_ids"]).float()
        torch.testing.assert_close(got[True], got[False], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got[True], want, rtol=5e-2, atol=5e-2)

"""Weighted mixing: realised token shares match the weights; the order is seeded."""

import torch

from ct_data import SourceConfig, build_pretrain_loader
from ct_data.mixing import uniform
from ctdata_helpers import make_docs, row_stream, source_of, split_pieces, write_jsonl

LENGTHS = {"a": (1, 20), "b": (20, 100), "c": (50, 150)}  # very different document lengths


def build(tmp_path, tokenizer, weights, seed, B=4, T=256, **kw):
    srcs = []
    for s, w in zip("abc", weights):
        lo, hi = LENGTHS[s]
        write_jsonl(tmp_path / f"{s}.jsonl", [{"text": t} for t in make_docs(s, 300, 1, lo, hi)])
        srcs.append(SourceConfig(s, str(tmp_path / f"{s}.jsonl"), weight=w))
    return build_pretrain_loader(srcs, tokenizer, T, B, seed=seed, max_doc_tokens=None, **kw)


def token_shares(tokenizer, batches, B):
    counts = {"a": 0, "b": 0, "c": 0}
    for row in range(B):
        ids, _, pos, _ = row_stream(batches, row)
        for piece in split_pieces(ids, pos):
            counts[source_of(tokenizer.decode(piece))] += len(piece)
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}, total


def test_token_shares_match_weights(tmp_path, tokenizer):
    weights = [0.6, 0.3, 0.1]
    B, T = 4, 256
    loader = build(tmp_path, tokenizer, weights, seed=11, B=B, T=T)
    steps = -(-200_000 // (B * T))
    batches = [next(loader) for _ in range(steps)]
    shares, total = token_shares(tokenizer, batches, B)
    assert total >= 200_000
    for s, w in zip("abc", weights):
        assert abs(shares[s] - w) < 0.02, (shares, weights)


def test_weights_need_not_sum_to_one(tmp_path, tokenizer):
    loader = build(tmp_path, tokenizer, [63.75, 10.66, 25.59], seed=0, B=2, T=128)
    batches = [next(loader) for _ in range(200)]
    shares, _ = token_shares(tokenizer, batches, 2)
    assert abs(shares["a"] - 0.6375) < 0.03 and abs(shares["b"] - 0.1066) < 0.03


def test_seeded_order(tmp_path, tokenizer):
    def run(seed):
        loader = build(tmp_path, tokenizer, [1, 1, 1], seed=seed, B=2, T=64, prefetch=0)
        return torch.cat([next(loader)["input_ids"] for _ in range(30)])

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_uniform_draws():
    u = [uniform(7, 0, i, 0) for i in range(20000)]
    assert all(0 <= x < 1 for x in u)
    assert abs(sum(u) / len(u) - 0.5) < 0.01
    assert abs(sum(x < 0.1 for x in u) / len(u) - 0.1) < 0.01

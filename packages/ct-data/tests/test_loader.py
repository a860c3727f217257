"""The loader: determinism, rank sharding (layout invariance), exact resume, prefetch, end of data."""

import json

import pytest
import torch

from ct_data import SourceConfig, build_pretrain_loader, build_sft_loader, merge_states
from ctdata_helpers import make_docs, write_jsonl


@pytest.fixture
def srcs(tmp_path):
    out = []
    for s, n, w in (("a", 200, 0.5), ("b", 15, 0.3), ("c", 80, 0.2)):  # "b" is tiny: it wraps often
        write_jsonl(tmp_path / f"{s}.jsonl", [{"text": t} for t in make_docs(s, n, 2)])
        out.append(SourceConfig(s, str(tmp_path / f"{s}.jsonl"), weight=w))
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_deterministic_for_seed(srcs, tokenizer):
    a = take(build_pretrain_loader(srcs, tokenizer, 32, 4, seed=7), 10)
    b = take(build_pretrain_loader(srcs, tokenizer, 32, 4, seed=7, prefetch=0), 10)
    same(a, b)  # also: prefetching changes nothing


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("packing", ["mixed", "per_source"])
def test_ranks_split_the_global_batch(srcs, tokenizer, world_size, packing):
    B, steps = 8, 12
    ref = take(build_pretrain_loader(srcs, tokenizer, 32, B, seed=1, packing=packing), steps)
    ranks = [take(build_pretrain_loader(srcs, tokenizer, 32, B, seed=1, rank=r, world_size=world_size,
                                        packing=packing), steps) for r in range(world_size)]
    for step in range(steps):
        for r in range(world_size):
            assert ranks[r][step]["input_ids"].shape == (B // world_size, 32)
        for k in ref[step]:
            assert torch.equal(torch.cat([ranks[r][step][k] for r in range(world_size)]), ref[step][k])


def test_sft_ranks_split_the_global_batch(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i} " * (i % 7 + 1)},
                          {"role": "assistant", "content": f"a{i} " * (i % 5 + 1)}]} for i in range(50)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    src = [SourceConfig("c", str(tmp_path / "c.jsonl"))]
    ref = take(build_sft_loader(src, tokenizer, 64, 4, seed=0), 8)
    r0 = take(build_sft_loader(src, tokenizer, 64, 4, seed=0, rank=0, world_size=2), 8)
    r1 = take(build_sft_loader(src, tokenizer, 64, 4, seed=0, rank=1, world_size=2), 8)
    for s in range(8):
        for k in ref[s]:
            assert torch.equal(torch.cat([r0[s][k], r1[s][k]]), ref[s][k])


@pytest.mark.parametrize("cut", [1, 9, 23])
def test_resume_is_exact(srcs, tokenizer, cut):
    B, total = 4, 30
    ref = take(build_pretrain_loader(srcs, tokenizer, 48, B, seed=3), total)
    first = build_pretrain_loader(srcs, tokenizer, 48, B, seed=3)
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))  # a plain, JSON-able dict
    if cut == 23:
        assert state["num_docs"]["b"] == 15  # the small source has wrapped before the cut
        assert first.stats()["sources"]["b"]["epoch"] >= 1
    again = build_pretrain_loader(srcs, tokenizer, 48, B, seed=3)
    again.load_state_dict(state)
    same(take(again, total - cut), ref[cut:])


def test_resume_sft(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i} " * (i % 9 + 1)},
                          {"role": "assistant", "content": f"a{i} " * (i % 13 + 1)}]} for i in range(23)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    src = [SourceConfig("c", str(tmp_path / "c.jsonl"))]
    ref = take(build_sft_loader(src, tokenizer, 96, 2, seed=0), 25)
    first = build_sft_loader(src, tokenizer, 96, 2, seed=0)
    take(first, 12)
    again = build_sft_loader(src, tokenizer, 96, 2, seed=0)
    again.load_state_dict(first.state_dict())
    same(take(again, 13), ref[12:])


def test_resume_with_another_world_size(srcs, tokenizer):
    B = 4
    ref = take(build_pretrain_loader(srcs, tokenizer, 32, B, seed=5), 20)
    ranks = [build_pretrain_loader(srcs, tokenizer, 32, B, seed=5, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        take(r, 8)
    merged = merge_states([r.state_dict() for r in ranks])
    single = build_pretrain_loader(srcs, tokenizer, 32, B, seed=5)
    single.load_state_dict(merged)
    same(take(single, 12), ref[8:])
    half = build_pretrain_loader(srcs, tokenizer, 32, B, seed=5, rank=1, world_size=2)
    with pytest.raises(ValueError, match="no entry for rows"):
        half.load_state_dict(ranks[0].state_dict())  # rank 0's state lacks rank 1's rows


def test_load_state_dict_mid_iteration_and_mismatch(srcs, tokenizer):
    loader = build_pretrain_loader(srcs, tokenizer, 32, 2, seed=0)
    take(loader, 3)
    state = loader.state_dict()
    after = take(loader, 4)  # the prefetch thread has run ahead of this
    loader.load_state_dict(state)
    same(take(loader, 4), after)
    other = build_pretrain_loader(srcs, tokenizer, 64, 2, seed=0)
    with pytest.raises(ValueError, match="seq_len: saved 32, now 64"):
        other.load_state_dict(state)


@pytest.mark.parametrize("packing", ["mixed", "per_source"])
def test_stop_policy_ends_the_data(tmp_path, tokenizer, packing):
    want = 0
    srcs = []
    for s, n in (("a", 9), ("b", 4)):
        docs = make_docs(s, n, 0)
        write_jsonl(tmp_path / f"{s}.jsonl", [{"text": t} for t in docs])
        srcs.append(SourceConfig(s, str(tmp_path / f"{s}.jsonl")))
        want += sum(len(tokenizer.encode(t)) + 2 for t in docs)
    for epochs in (1, 2):
        loader = build_pretrain_loader(srcs, tokenizer, 16, 2, seed=0, packing=packing, on_exhausted="stop",
                                       max_epochs=epochs)
        batches = list(loader)
        real = sum(int((b["document_ids"] != -1).sum()) for b in batches)
        assert real == epochs * want  # every token of every epoch, then the loader stops
        st = loader.stats()["sources"]
        assert st["a"]["docs"] == 9 * epochs and st["b"]["docs"] == 4 * epochs
        with pytest.raises(StopIteration):
            next(loader)

"""workers=N: the rank's rows produced in spawned processes give exactly the in-process batches,
resume exactly (also with another number of workers), end together, and pass errors on.
Marked slow: each test spawns processes that import torch (5-15 s on 2 shared cores)."""

import pytest
import torch

from ct_data import DataConfigError, SourceConfig, build_pretrain_loader, build_sft_loader
from ctdata_helpers import make_docs, write_jsonl

pytestmark = pytest.mark.slow


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.fixture
def srcs(tmp_path):
    out = []
    for s, n in (("a", 120), ("b", 15)):
        write_jsonl(tmp_path / f"{s}.jsonl", [{"text": t} for t in make_docs(s, n, 2)])
        out.append(SourceConfig(s, str(tmp_path / f"{s}.jsonl")))
    return out


def test_workers_match_and_resume(srcs, tokenizer):
    kw = dict(seed=1, rank=1, world_size=2, packing="per_source")
    ref = build_pretrain_loader(srcs, tokenizer, 32, 10, **kw)
    ref_batches = [next(ref) for _ in range(14)]
    a = build_pretrain_loader(srcs, tokenizer, 32, 10, workers=3, **kw)  # 5 rows in blocks of 2, 2, 1
    got = [next(a) for _ in range(8)]
    state = a.state_dict()
    a.close()
    b = build_pretrain_loader(srcs, tokenizer, 32, 10, workers=2, **kw)
    b.load_state_dict(state)
    got += [next(b) for _ in range(6)]
    b.close()
    same(got, ref_batches)
    assert state == build_state_after(srcs, tokenizer, 8, **kw)  # the merged state of the blocks


def build_state_after(srcs, tokenizer, steps, **kw):
    loader = build_pretrain_loader(srcs, tokenizer, 32, 10, prefetch=0, **kw)
    for _ in range(steps):
        next(loader)
    return loader.state_dict()


def test_sft_workers_end_together(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": f"q{i} " * (i % 9 + 1)},
                          {"role": "assistant", "content": f"a{i} " * (i % 13 + 1)}]} for i in range(30)]
    write_jsonl(tmp_path / "c.jsonl", rows)
    src = [SourceConfig("c", str(tmp_path / "c.jsonl"))]
    kw = dict(seed=0, on_exhausted="stop", max_epochs=1)
    ref = list(build_sft_loader(src, tokenizer, 64, 4, **kw))
    got = list(build_sft_loader(src, tokenizer, 64, 4, workers=2, **kw))
    same(got, ref)  # blocks whose rows end first pad until every row has ended


def test_worker_errors_reach_the_training_process(srcs, tokenizer):
    loader = build_pretrain_loader(srcs, tokenizer, 32, 2, seed=0, workers=1)
    import os

    os.remove(srcs[1].path)  # gone between building the loader and its first batch
    with pytest.raises(DataConfigError, match=r"source 'b': field 'path': file .*b\.jsonl' does not exist"):
        next(loader)
    with pytest.raises(DataConfigError, match="workers 3 exceeds the per-rank batch 2"):
        build_pretrain_loader(srcs[:1], tokenizer, 32, 2, seed=0, workers=3)

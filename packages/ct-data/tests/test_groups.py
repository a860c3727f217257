"""Shard groups: a source of S files read with a global batch of B rows is G = gcd(S, B) groups;
group g (files g, g+G, ...) feeds rows g*B/G ... as a source of its own. Checked against a
hand-derived document order, raw == prepared, each rank opening only its groups' files, exact
resume across world sizes, and the warning that names the cost when ranks share groups."""

import json
import logging

import pytest
import torch

from ct_data import SourceConfig, build_pretrain_loader, merge_states
from ct_data import reader as reader_mod
from ct_data.prepare import tokenize_sources
from ctdata_helpers import make_docs, row_stream, split_pieces, write_jsonl

FILES, PER_FILE = 4, 9


@pytest.fixture
def files(tmp_path):
    """Four files of distinct documents; file k holds documents tagged a{k*9} .. a{k*9+8}."""
    docs = make_docs("a", FILES * PER_FILE, 5)
    for k in range(FILES):
        write_jsonl(tmp_path / "a" / f"{k}.jsonl", [{"text": t, "file": k} for t in docs[k * PER_FILE:(k + 1) * PER_FILE]])
    return docs, [SourceConfig("a", str(tmp_path / "a"))]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_rows_draw_from_their_group(files, tokenizer):
    """B=8, 4 files: G=4, R=2 rows per group; row j reads file j//2, local row j%2 takes its
    documents l, l+2, l+4 ... cycling through the file."""
    docs, src = files
    B, steps = 8, 12
    loader = build_pretrain_loader(src, tokenizer, 24, B, seed=0, max_doc_tokens=None, prefetch=0)
    batches = take(loader, steps)
    assert loader.fingerprint["source_groups"] == {"a": 4}
    for j in range(B):
        g, l = divmod(j, 2)
        mine = docs[g * PER_FILE:(g + 1) * PER_FILE]
        want = [[tokenizer.bos_id] + tokenizer.encode(mine[(l + 2 * k) % PER_FILE]) + [tokenizer.eos_id]
                for k in range(40)]
        ids, _, pos, _ = row_stream(batches, j)
        pieces = split_pieces(ids, pos)
        assert pieces[:-1] == want[:len(pieces) - 1]
        assert want[len(pieces) - 1][:len(pieces[-1])] == pieces[-1]


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_raw_equals_prepared_and_ranks(files, tokenizer, tmp_path, world_size):
    _, src = files
    tokenize_sources(src, tokenizer, tmp_path / "tok", workers=0)
    prep = [SourceConfig("a", str(tmp_path / "tok" / "a"))]
    B, steps = 8, 15
    ref = take(build_pretrain_loader(src, tokenizer, 32, B, seed=2), steps)
    ranks = [take(build_pretrain_loader(prep, tokenizer, 32, B, seed=2, rank=r, world_size=world_size), steps)
             for r in range(world_size)]
    for step in range(steps):
        for k in ref[step]:
            assert torch.equal(torch.cat([ranks[r][step][k] for r in range(world_size)]), ref[step][k])


def test_each_rank_reads_only_its_groups_files(files, tokenizer, monkeypatch):
    _, src = files
    seen: list[int] = []
    orig = reader_mod.iter_record_batches

    def spy(s, ds, start, n):
        for batch in orig(s, ds, start, n):
            seen.extend(r["file"] for r in batch)
            yield batch

    monkeypatch.setattr(reader_mod, "iter_record_batches", spy)
    for r in range(4):  # B=8, W=4: rank r holds rows 2r, 2r+1 = group r = file r
        seen.clear()
        take(build_pretrain_loader(src, tokenizer, 32, 8, seed=0, rank=r, world_size=4, prefetch=0), 10)
        assert seen and set(seen) == {r}


def test_resume_with_another_world_size_after_wrapping(files, tokenizer):
    _, src = files
    B = 8
    ref = take(build_pretrain_loader(src, tokenizer, 32, B, seed=4), 40)
    ranks = [build_pretrain_loader(src, tokenizer, 32, B, seed=4, rank=r, world_size=4) for r in range(4)]
    for r in ranks:
        take(r, 25)
    merged = json.loads(json.dumps(merge_states([r.state_dict() for r in ranks])))
    assert merged["num_docs"]["a"] == {str(g): PER_FILE for g in range(4)}  # every group has wrapped
    single = build_pretrain_loader(src, tokenizer, 32, B, seed=4)
    single.load_state_dict(merged)
    same(take(single, 15), ref[25:])
    assert single.stats()["sources"]["a"]["epoch"] >= 1


def test_the_cost_of_shared_groups_is_named(tmp_path, tokenizer, caplog):
    write_jsonl(tmp_path / "one.jsonl", [{"text": t} for t in make_docs("a", 20, 0)])
    with caplog.at_level(logging.WARNING, logger="ct_data"):
        build_pretrain_loader([SourceConfig("one", str(tmp_path / "one.jsonl"))], tokenizer, 32, 4, seed=0,
                              world_size=4)
    assert "source 'one': 1 shard(s) and a global batch of 4 give 1 shard group(s), so each of the 4 ranks " \
           "reads 100% of it to use 25.0%: 4x the reading" in caplog.text

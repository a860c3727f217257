"""Pre-tokenized sources: `ct-data tokenize` output read by the loader gives exactly the batches of
the raw-jsonl loader, each rank reads only its rows' documents, resume reads nothing but what the
next batch needs, tokenizing resumes after a kill, and bad files are clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ct_data import DataConfigError, SourceConfig, build_pretrain_loader, build_sft_loader, merge_states
from ct_data import prepare
from ct_data.indexed import IndexedDataError
from ct_data.prepare import tokenize_sources
from ct_data.prepared import MANIFEST, PreparedSource
from ct_data.reader import IndexedReader
from ctdata_helpers import make_docs, write_jsonl


@pytest.fixture
def raw(tmp_path):
    """Three sources; "a" spread over three files (three shards), "b" tiny (it wraps often)."""
    out = []
    for s, n, w in (("a", 200, 0.5), ("b", 15, 0.3), ("c", 80, 0.2)):
        docs = make_docs(s, n, 2)
        if s == "a":
            for k in range(3):
                write_jsonl(tmp_path / "raw" / "a" / f"part{k}.jsonl", [{"text": t} for t in docs[k * 70:(k + 1) * 70]])
            out.append(SourceConfig(s, str(tmp_path / "raw" / "a"), weight=w))
        else:
            write_jsonl(tmp_path / "raw" / f"{s}.jsonl", [{"text": t} for t in docs])
            out.append(SourceConfig(s, str(tmp_path / "raw" / f"{s}.jsonl"), weight=w))
    return out


@pytest.fixture
def prepared(raw, tokenizer, tmp_path):
    tokenize_sources(raw, tokenizer, tmp_path / "tok", workers=0)
    return [SourceConfig(s.name, str(tmp_path / "tok" / s.name), weight=s.weight) for s in raw]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_shards_hold_each_documents_tokens(raw, prepared, tokenizer):
    src = PreparedSource(prepared[0].path, tokenizer=tokenizer)
    texts = make_docs("a", 200, 2)[:210]
    assert src.num_docs == 200 and len(src.prefixes) == 3
    assert [src.doc(i).tolist() for i in range(200)] == [tokenizer.encode(t) for t in texts]
    m = json.loads((src.prefixes[0].parent / MANIFEST).read_text())
    assert m["complete"] and m["totals"]["docs"] == 200 and m["dtype"] == "uint16"
    assert [s["docs"] for s in m["shards"]] == [70, 70, 60]


@pytest.mark.parametrize("packing", ["mixed", "per_source"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_batches_equal_the_raw_loaders(raw, prepared, tokenizer, packing, world_size):
    B, steps = 8, 25
    ref = take(build_pretrain_loader(raw, tokenizer, 32, B, seed=1, packing=packing), steps)
    ranks = [take(build_pretrain_loader(prepared, tokenizer, 32, B, seed=1, rank=r, world_size=world_size,
                                        packing=packing), steps) for r in range(world_size)]
    for step in range(steps):
        for k in ref[step]:
            assert torch.equal(torch.cat([ranks[r][step][k] for r in range(world_size)]), ref[step][k])


def test_each_rank_reads_only_its_rows_documents(prepared, tokenizer, monkeypatch):
    B, W, steps = 8, 4, 20
    read: list[tuple[int, str, int]] = []
    orig = IndexedReader._doc_at

    def spy(self, position):
        read.append((self.rows.start, self.src.name, position))
        return orig(self, position)

    monkeypatch.setattr(IndexedReader, "_doc_at", spy)
    one = build_pretrain_loader(prepared, tokenizer, 32, B, seed=1, prefetch=0)
    take(one, steps)
    single = {(n, p) for _, n, p in read}
    read.clear()
    per_rank = {}
    for r in range(W):
        loader = build_pretrain_loader(prepared, tokenizer, 32, B, seed=1, rank=r, world_size=W, prefetch=0)
        take(loader, steps)
        rows = loader.rows
        mine = [(n, p) for start, n, p in read if start == rows.start]
        assert mine and all(p % B in rows for _, p in mine)  # only documents of its own rows
        per_rank[r] = set(mine)
    assert set().union(*per_rank.values()) == single  # together: exactly what one process reads
    assert sum(len(v) for v in per_rank.values()) == len(single)  # and no document twice


@pytest.mark.parametrize("packing", ["mixed", "per_source"])
def test_resume_reads_only_what_the_next_batch_needs(prepared, tokenizer, monkeypatch, packing):
    B, cut, total = 4, 23, 30
    ref = build_pretrain_loader(prepared, tokenizer, 48, B, seed=3, packing=packing, prefetch=0)
    ref_batches = take(ref, total)
    first = build_pretrain_loader(prepared, tokenizer, 48, B, seed=3, packing=packing, prefetch=0)
    take(first, cut)
    state = json.loads(json.dumps(first.state_dict()))
    carry = [e for r in state["rows"].values() for e in r["carry"]]
    assert carry and all("ref" in e and "ids" not in e for e in carry)  # positions, not tokens

    reads = []
    orig = IndexedReader._doc_at
    monkeypatch.setattr(IndexedReader, "_doc_at", lambda self, p: reads.append(p) or orig(self, p))
    cont = build_pretrain_loader(prepared, tokenizer, 48, B, seed=3, packing=packing, prefetch=0)
    cont.load_state_dict(state)
    batch = next(cont)
    after = cont.state_dict()
    drawn = sum(after["rows"][j]["cursors"][n] - state["rows"][j]["cursors"][n]
                for j in state["rows"] for n in ("a", "b", "c"))
    # One re-read per carried piece, plus the documents batch `cut` draws: nothing before them.
    assert len(reads) == len(carry) + drawn
    same([batch] + take(cont, total - cut - 1), ref_batches[cut:])


def test_resume_with_another_world_size(prepared, tokenizer):
    B = 4
    ref = take(build_pretrain_loader(prepared, tokenizer, 32, B, seed=5, packing="per_source"), 20)
    ranks = [build_pretrain_loader(prepared, tokenizer, 32, B, seed=5, rank=r, world_size=2, packing="per_source")
             for r in range(2)]
    for r in ranks:
        take(r, 8)
    single = build_pretrain_loader(prepared, tokenizer, 32, B, seed=5, packing="per_source")
    single.load_state_dict(merge_states([r.state_dict() for r in ranks]))
    same(take(single, 12), ref[8:])


def test_stop_policy_and_stats_match_raw(raw, prepared, tokenizer):
    kw = dict(on_exhausted="stop", max_epochs=2, prefetch=0)
    a = list(build_pretrain_loader(raw, tokenizer, 16, 2, seed=0, **kw))
    pl = build_pretrain_loader(prepared, tokenizer, 16, 2, seed=0, **kw)
    b = list(pl)
    same(a, b)
    st = pl.stats()["sources"]
    assert st["a"]["docs"] == 400 and st["b"]["docs"] == 30 and st["a"]["num_docs"] == 200


def test_sft_loader_refuses_prepared_sources(prepared, tokenizer):
    with pytest.raises(DataConfigError, match="source 'a': prepared"):
        build_sft_loader(prepared[:1], tokenizer, 32, 2, seed=0)


# ----------------------------------------------------------------------------- tokenize
def test_tokenize_resumes_after_a_kill(raw, tokenizer, tmp_path, monkeypatch):
    clean = tokenize_sources(raw[:1], tokenizer, tmp_path / "clean", workers=0)["a"]
    real = prepare.run_job

    def dies_on_second(job):
        if job.index == 1:
            raise KeyboardInterrupt  # as if killed while writing shard 1
        return real(job)

    monkeypatch.setattr(prepare, "run_job", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        tokenize_sources(raw[:1], tokenizer, tmp_path / "out", workers=0)
    with pytest.raises(IndexedDataError, match="tokenization did not finish .* run `ct-data tokenize` again"):
        PreparedSource(str(tmp_path / "out" / "a"), tokenizer=tokenizer)
    monkeypatch.setattr(prepare, "run_job", real)
    redone = []
    again = tokenize_sources(raw[:1], tokenizer, tmp_path / "out", workers=0, on_job_done=redone.append)["a"]
    assert [e["name"] for e in redone] == ["00001", "00002"]  # shard 0 was kept
    assert again["shards"] == clean["shards"]  # same files, same hashes
    assert tokenize_sources(raw[:1], tokenizer, tmp_path / "out", workers=0, on_job_done=redone.append)
    assert len(redone) == 2  # a finished directory: nothing to do


def test_tokenize_refuses_other_input(raw, tokenizer, tmp_path):
    tokenize_sources(raw[1:2], tokenizer, tmp_path / "out", workers=0)
    write_jsonl(Path(raw[1].path), [{"text": "something else"}])
    with pytest.raises(DataConfigError, match=r"manifest.json: prepared from other input \(input differ"):
        tokenize_sources(raw[1:2], tokenizer, tmp_path / "out", workers=0)


def test_tokenize_counts_skipped_documents(tmp_path, tokenizer):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "good one"}, {"text": ""}, {"text": 3}, {"text": "two"}])
    m = tokenize_sources([SourceConfig("x", str(tmp_path / "x.jsonl"))], tokenizer, tmp_path / "o", workers=0)["x"]
    assert m["totals"]["docs"] == 2 and m["totals"]["skipped"] == {"empty": 1, "non_string": 1}


# ----------------------------------------------------------------------------- bad input
def test_manifest_of_another_tokenizer(prepared, tmp_path):
    from ct_data import train_tokenizer

    other = train_tokenizer(["completely different text"] * 20, 300, tmp_path / "other")
    with pytest.raises(IndexedDataError, match=r"a/manifest.json: prepared with tokenizer .* but this run's "
                                               r"tokenizer is"):
        build_pretrain_loader(prepared, other, 32, 2, seed=0)


def test_shard_that_does_not_match_its_manifest(prepared, tokenizer):
    f = f"{prepared[0].path}/00001.bin"
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-10])
    with pytest.raises(IndexedDataError, match=r"a/00001\.bin: .* bytes, but .*manifest.json records"):
        build_pretrain_loader(prepared, tokenizer, 32, 2, seed=0)


@pytest.mark.slow  # --workers 2: spawned processes
def test_cli_tokenize_verify_and_train_config(raw, tokenizer, tmp_path, capsys):
    import yaml

    from ct_data import load_data_config
    from ct_data.cli import main

    cfg = tmp_path / "mix.yaml"
    cfg.write_text(yaml.safe_dump({"name": "mix", "kind": "pretrain", "loader": {"packing": "per_source"},
                                   "sources": [{"name": s.name, "path": s.path, "weight": s.weight} for s in raw]}))
    tokenizer.save(str(tmp_path / "tk"))
    out = tmp_path / "out"
    assert main(["tokenize", str(cfg), "--tokenizer", str(tmp_path / "tk"), "--out", str(out), "--workers", "2"]) == 0
    mix = load_data_config(out / "mix.yaml")  # the prepared config: same weights and options, indexed paths
    assert [s.file_format for s in mix.sources] == ["indexed"] * 3 and mix.loader_options == {"packing": "per_source"}
    ref = load_data_config(cfg).build_loader(tokenizer, 32, 4, seed=0)
    same(take(mix.build_loader(tokenizer, 32, 4, seed=0), 10), take(ref, 10))
    assert main(["verify", str(out / "a")]) == 0
    f = out / "a" / "00000.bin"
    data = bytearray(f.read_bytes())
    data[0] ^= 1  # same size, other content: only the hash can tell
    f.write_bytes(bytes(data))
    assert main(["verify", str(out / "a")]) == 2
    assert "00000.bin: SHA-256 differs" in capsys.readouterr().err
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({"kind": "sft", "sources": [{"name": "s", "path": raw[1].path}]}))
    assert main(["tokenize", str(sft), "--tokenizer", str(tmp_path / "tk"), "--out", str(out)]) == 2
    assert "only pretraining mixtures" in capsys.readouterr().err


def test_large_vocabulary_is_int32(tmp_path):
    from ct_data import train_tokenizer

    write_jsonl(tmp_path / "x.jsonl", [{"text": "hello world"}])

    class Big:  # the tokenizer, claiming LLaMA-3's vocabulary size
        def __init__(self, tok):
            self.tok = tok

        def __getattr__(self, k):
            return 128256 if k == "vocab_size" else getattr(self.tok, k)

    tok = Big(train_tokenizer(["hello world"] * 10, 280, tmp_path / "t"))
    m = tokenize_sources([SourceConfig("x", str(tmp_path / "x.jsonl"))], tok, tmp_path / "o", workers=0)["x"]
    assert m["dtype"] == "int32"
    src = PreparedSource(str(tmp_path / "o" / "x"))
    assert src.shard(0).dtype == np.int32 and src.doc(0).tolist() == tok.encode("hello world")

"""Packing: no token lost, document boundaries, labels, positions, per-source sequences, length caps."""

import pytest
import torch

from ct_data import SourceConfig, build_pretrain_loader
from ctdata_helpers import make_docs, row_stream, source_of, split_pieces, write_jsonl


def sources(tmp_path, names="abc", n=40, weights=None, lo=1, hi=60):
    out = []
    for k, s in enumerate(names):
        write_jsonl(tmp_path / f"{s}.jsonl", [{"text": t} for t in make_docs(s, n, 0, lo, hi)])
        out.append(SourceConfig(s, str(tmp_path / f"{s}.jsonl"), weight=(weights or [1] * len(names))[k]))
    return out


def expected_docs(tok, s, n, B, row, add_eos=True, lo=1, hi=60):
    """Row `row`'s documents of source s, in order: records row, row+B, row+2B ... (cycling)."""
    docs = make_docs(s, n, 0, lo, hi)
    k = 0
    while True:
        t = docs[(row + B * k) % n]
        yield [tok.bos_id] + tok.encode(t) + ([tok.eos_id] if add_eos else [])
        k += 1


@pytest.mark.parametrize("add_eos", [True, False])
def test_no_token_lost_and_boundaries(tmp_path, tokenizer, add_eos):
    B, T, steps = 3, 48, 60
    srcs = sources(tmp_path)
    loader = build_pretrain_loader(srcs, tokenizer, T, B, seed=3, add_eos=add_eos, max_doc_tokens=None, prefetch=0)
    batches = [next(loader) for _ in range(steps)]
    for step, b in enumerate(batches):
        index = b.pop("sequence_index")  # each row's global position in the loader's order
        assert index.tolist() == [step * B + j for j in range(B)]
        assert all(v.shape == (B, T) and v.dtype == torch.long for v in b.values())
    for row in range(B):
        ids, labels, pos, doc = row_stream(batches, row)
        refs = {s.name: expected_docs(tokenizer, s.name, 40, B, row, add_eos) for s in srcs}
        pieces = split_pieces(ids, pos)
        # Every piece but the last (cut by the end of the run) is exactly the next document of its source.
        for piece in pieces[:-1]:
            s = source_of(tokenizer.decode(piece))
            assert piece == next(refs[s])
        last = pieces[-1]
        assert last == next(refs[source_of(tokenizer.decode(last))])[: len(last)]
        # Labels: the next token of the same document, -100 at each document's last token.
        for i in range(len(ids) - 1):
            same_doc = pos[i + 1] == pos[i] + 1
            assert labels[i] == (ids[i + 1] if same_doc else -100)
        # BOS starts every document; EOS ends it when asked.
        starts = [i for i, p in enumerate(pos) if p == 0]
        assert all(ids[i] == tokenizer.bos_id for i in starts)
        ends = [i - 1 for i in starts[1:]]
        assert all((ids[i] == tokenizer.eos_id) == add_eos for i in ends)
    # document_ids: a new id exactly where a document starts (or a row starts), counted per row.
    for b in batches:
        for row in range(B):
            pos, doc = b["position_ids"][row].tolist(), b["document_ids"][row].tolist()
            assert doc[0] == 0
            for i in range(1, T):
                assert doc[i] == doc[i - 1] + (1 if pos[i] == 0 else 0)
    assert loader.stats()["packing_efficiency"] == 1.0


def test_positions_continue_across_rows(tmp_path, tokenizer):
    write_jsonl(tmp_path / "long.jsonl", [{"text": " ".join(["word"] * 200)}])
    loader = build_pretrain_loader([SourceConfig("l", str(tmp_path / "long.jsonl"))], tokenizer, 32, 1, seed=0,
                                   max_doc_tokens=None, prefetch=0)
    n = len(tokenizer.encode(" ".join(["word"] * 200))) + 2
    pos = torch.cat([next(loader)["position_ids"][0] for _ in range(-(-n // 32))]).tolist()
    assert pos[:n] == list(range(n))


@pytest.mark.parametrize("policy", ["split", "truncate"])
def test_long_documents(tmp_path, tokenizer, policy):
    texts = [" ".join(["alpha"] * k) for k in (5, 90, 10, 300)]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    cap = 40
    docs = [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id] for t in texts]
    assert sum(len(d) > cap for d in docs) == 2
    if policy == "split":
        ref = [d[i:i + cap] for d in docs for i in range(0, len(d), cap)]
    else:
        ref = [d[:cap] for d in docs]
    total = sum(map(len, ref))
    loader = build_pretrain_loader([SourceConfig("d", str(tmp_path / "d.jsonl"))], tokenizer, 64, 1, seed=0,
                                   max_doc_tokens=cap, long_doc_policy=policy, prefetch=0)
    batches = [next(loader) for _ in range(-(-total // 64))]
    ids, labels, pos, doc = row_stream(batches)
    assert split_pieces(ids[:total], pos[:total]) == ref
    assert max(pos) < cap
    st = loader.stats()["sources"]["d"]
    if policy == "split":
        assert st["split"] >= 2 and st["truncated"] == 0 and st["lost_tokens"] == 0
    else:
        assert st["truncated"] >= 2
        lost = sum(len(d) - cap for d in docs if len(d) > cap)
        assert st["lost_tokens"] == lost * (st["docs"] // 4) + sum(
            len(d) - cap for d in docs[: st["docs"] % 4] if len(d) > cap)


def test_default_cap_is_seq_len(tmp_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(["beta"] * 500)}])
    loader = build_pretrain_loader([SourceConfig("d", str(tmp_path / "d.jsonl"))], tokenizer, 64, 2, seed=0, prefetch=0)
    for _ in range(20):
        assert next(loader)["position_ids"].max() < 64


def test_per_source_sequences(tmp_path, tokenizer):
    B, T, steps = 2, 40, 80
    srcs = sources(tmp_path, weights=[0.5, 0.3, 0.2])
    loader = build_pretrain_loader(srcs, tokenizer, T, B, seed=5, packing="per_source", add_eos=False, prefetch=0)
    batches = [next(loader) for _ in range(steps)]
    counts = {"a": 0, "b": 0, "c": 0}
    for b in batches:
        for row in range(B):
            text = tokenizer.decode(b["input_ids"][row].tolist())
            counts[source_of(text)] += 1  # source_of asserts the sequence holds a single source
    total = steps * B
    assert abs(counts["a"] / total - 0.5) < 0.05 and abs(counts["c"] / total - 0.2) < 0.05
    # Per source, the row's carried-over pieces continue exactly: the source's documents in order.
    for row in range(B):
        per = {"a": [], "b": [], "c": []}
        for b in batches:
            ids = b["input_ids"][row].tolist()
            per[source_of(tokenizer.decode(ids))] += ids
        for s in srcs:
            ref = expected_docs(tokenizer, s.name, 40, B, row, add_eos=False)
            stream = per[s.name]
            want = []
            while len(want) < len(stream):
                want += next(ref)
            assert stream == want[: len(stream)]
    assert loader.stats()["packing_efficiency"] >= 0.99

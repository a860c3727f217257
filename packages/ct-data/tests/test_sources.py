"""Reading local files of every format, skip accounting, and bad-input errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ct_data import DataConfigError, SourceConfig, build_pretrain_loader, build_sft_loader
from ctdata_helpers import write_jsonl


def all_docs(loader, steps):
    """Documents (lists of token ids) of a single-row loader, split where position_ids restart at 0."""
    ids = torch.cat([next(loader)["input_ids"][0] for _ in range(steps)]).tolist()
    return ids


def expected_stream(tok, texts, add_eos=True):
    out = []
    for t in texts:
        out += [tok.bos_id] + tok.encode(t) + ([tok.eos_id] if add_eos else [])
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_local_formats_read_in_order(tmp_path, tokenizer, fmt):
    texts = [f"document number {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(12)]
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in texts])
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps([{"body": t} for t in texts]))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"body": texts}), path)
    else:  # one document per .txt file, read from a directory
        for i, t in enumerate(texts):
            (tmp_path / "txt").mkdir(exist_ok=True)
            (tmp_path / "txt" / f"{i:03d}.txt").write_text(t)
        path = tmp_path / "txt"
    field = "text" if fmt == "txt" else "body"
    src = SourceConfig("s", str(path), text_field=field)
    ref = expected_stream(tokenizer, texts)
    steps = -(-len(ref) // 32)
    loader = build_pretrain_loader([src], tokenizer, 32, 1, seed=0, prefetch=0, max_doc_tokens=None)
    got = all_docs(loader, steps)
    assert got[: len(ref)] == ref
    assert got[len(ref):] == ref[: len(got) - len(ref)]  # then the source cycles from its start


def test_glob_and_directory(tmp_path, tokenizer):
    write_jsonl(tmp_path / "p" / "b.jsonl", [{"text": "second file"}])
    write_jsonl(tmp_path / "p" / "a.jsonl", [{"text": "first file"}])
    ref = expected_stream(tokenizer, ["first file", "second file"])
    for path in (tmp_path / "p", str(tmp_path / "p" / "*.jsonl")):
        loader = build_pretrain_loader([SourceConfig("s", str(path))], tokenizer, len(ref), 1, seed=0, prefetch=0)
        assert next(loader)["input_ids"][0].tolist() == ref  # files in sorted order


def test_bad_documents_are_skipped_and_counted(tmp_path, tokenizer):
    rows = [({"text": "good one"}, None), ({"text": ""}, "empty"), ({"text": "   \n"}, "empty"),
            ({"text": None}, "empty"), ({"text": 5}, "non_string"), ({"text": ["a", "list"]}, "non_string"),
            ({"other": "no text field here"}, "empty"), ({"text": "bad \ufffd char"}, "undecodable"),
            ({"text": "good two"}, None)]
    write_jsonl(tmp_path / "d.jsonl", [r for r, _ in rows])
    pq.write_table(pa.table({"text": pa.array([b"bytes ok", b"\xff\xfe not utf-8"], pa.binary())}),
                   tmp_path / "b.parquet")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.txt").write_bytes(b"line fine\n\xff broken line\n")
    srcs = [SourceConfig("j", str(tmp_path / "d.jsonl")), SourceConfig("p", str(tmp_path / "b.parquet")),
            SourceConfig("t", str(tmp_path / "t"), text_sample_by="line")]
    loader = build_pretrain_loader(srcs, tokenizer, 16, 1, seed=0, prefetch=0)
    text = tokenizer.decode(torch.cat([next(loader)["input_ids"][0] for _ in range(40)]).tolist())
    stats, cursors = loader.stats()["sources"], loader.state_dict()["rows"]["0"]["cursors"]
    # Reference: the hand-labelled reasons of the records drawn so far (the source cycles).
    expected = {}
    for i in range(cursors["j"]):
        reason = rows[i % len(rows)][1]
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert stats["j"]["skipped"] == expected
    assert stats["p"]["skipped"] == {"undecodable": cursors["p"] // 2}
    assert stats["t"]["skipped"] == {"undecodable": cursors["t"] // 2}
    assert stats["j"]["docs"] == sum(1 for i in range(cursors["j"]) if rows[i % len(rows)][1] is None)
    assert "good one" in text and "good two" in text and "bytes ok" in text and "line fine" in text
    assert "\ufffd" not in text and "broken" not in text and "list" not in text


def test_text_template(tmp_path, tokenizer):
    write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 1+1?", "answer": "2"}])
    src = SourceConfig("qa", str(tmp_path / "qa.jsonl"), text_template="Q: {question}\nA: {answer}")
    loader = build_pretrain_loader([src], tokenizer, 64, 1, seed=0, prefetch=0)
    ref = expected_stream(tokenizer, ["Q: What is 1+1?\nA: 2"])
    assert next(loader)["input_ids"][0].tolist()[: len(ref)] == ref


# --------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(DataConfigError, match=r"source 'web'.*'path'.*does not exist"):
        build_pretrain_loader([SourceConfig("web", str(tmp_path / "nope.jsonl"))], tokenizer, 16, 1, 0)
    with pytest.raises(DataConfigError, match=r"source 'web'.*no file matches"):
        build_pretrain_loader([SourceConfig("web", str(tmp_path / "*.parquet"))], tokenizer, 16, 1, 0)


def test_missing_field(tmp_path, tokenizer):
    write_jsonl(tmp_path / "d.jsonl", [{"content": "x"}])
    with pytest.raises(DataConfigError, match=r"source 'code'.*field 'text' not found.*\['content'\]"):
        build_pretrain_loader([SourceConfig("code", str(tmp_path / "d.jsonl"))], tokenizer, 16, 1, 0)
    with pytest.raises(DataConfigError, match=r"source 'chat'.*field 'messages' not found"):
        build_sft_loader([SourceConfig("chat", str(tmp_path / "d.jsonl"))], tokenizer, 16, 1, 0)
    with pytest.raises(DataConfigError, match=r"source 'qa'.*field 'question' not found"):
        build_sft_loader([SourceConfig("qa", str(tmp_path / "d.jsonl"), prompt_field="question",
                                       response_field="answer")], tokenizer, 16, 1, 0)


def test_bad_weights(tmp_path, tokenizer):
    with pytest.raises(DataConfigError, match=r"source 'x'.*'weight'.*>= 0"):
        SourceConfig("x", "a.jsonl", weight=-1)
    with pytest.raises(DataConfigError, match=r"source 'x'.*'weight'"):
        SourceConfig("x", "a.jsonl", weight=float("nan"))
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    srcs = [SourceConfig(n, str(tmp_path / "d.jsonl"), weight=0) for n in ("x", "y")]
    with pytest.raises(DataConfigError, match=r"all zero.*'weight'"):
        build_pretrain_loader(srcs, tokenizer, 16, 1, 0)


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 1}, "seq_len must be an integer >= 2"),
    ({"batch_size": 3, "world_size": 2}, "not divisible by world_size"),
    ({"rank": 2, "world_size": 2, "batch_size": 2}, "rank 2 is not below world_size 2"),
])
def test_bad_loader_arguments(tmp_path, tokenizer, kwargs, match):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    args = {"seq_len": 16, "batch_size": 2, "seed": 0, **kwargs}
    with pytest.raises(DataConfigError, match=match):
        build_pretrain_loader([SourceConfig("x", str(tmp_path / "d.jsonl"))], tokenizer, **args)


def test_unknown_source_field():
    with pytest.raises(DataConfigError, match=r"unknown field\(s\) \['txt_field'\]"):
        SourceConfig.from_dict({"name": "x", "path": "a.jsonl", "txt_field": "body"})

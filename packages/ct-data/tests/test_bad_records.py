"""A malformed record in a local source is found before training, with its file and line; records
with empty or non-string text are skipped and counted, never silently lost."""

from __future__ import annotations

import json

import pytest

from ct_data import DataSourceError, build_pretrain_loader
from ct_data.sources import check_local_records
from ct_data.config import SourceConfig


def write_jsonl(path, bad_line: str | None, n=400, at=250):
    lines = [json.dumps({"text": f"document number {i} " * 8}) for i in range(n)]
    if bad_line is not None:
        lines.insert(at, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_broken_line_is_named_before_any_batch(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", '{"text": "unterminated')
    with pytest.raises(DataSourceError) as err:
        check_local_records(SourceConfig(name="web", path=str(path)))
    assert f"{path}:251" in str(err.value) and "source 'web'" in str(err.value)


def test_the_loader_refuses_a_broken_file_at_construction(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "broken.jsonl", "not json at all")
    with pytest.raises(DataSourceError, match=r"broken.jsonl:251"):
        build_pretrain_loader([{"name": "web", "path": str(path)}], tokenizer, seq_len=64, batch_size=2, seed=0)


@pytest.mark.parametrize("line, reason", [('{"text": 42}', "non_string"), ('{"text": ""}', "empty")])
def test_bad_text_in_the_middle_is_skipped_and_counted(tmp_path, tokenizer, line, reason):
    path = write_jsonl(tmp_path / "odd.jsonl", line)
    assert check_local_records(SourceConfig(name="web", path=str(path))) == 401
    loader = build_pretrain_loader([{"name": "web", "path": str(path)}], tokenizer, seq_len=64, batch_size=2,
                                   seed=0, prefetch=0)
    stats = {}
    for _ in range(400):  # well past the odd record at position 250
        next(loader)
        stats = loader.stats()["sources"]["web"]
        if stats["skipped"]:
            break
    assert stats["skipped"] == {reason: 1}

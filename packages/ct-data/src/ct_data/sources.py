"""Opening a source through ``datasets`` (local files or the hub, always streaming) and pulling
documents out of its records, with every rejected document given a reason."""

from __future__ import annotations

import glob as _glob
import logging
import os
import re
from collections.abc import Iterator
from typing import Any

from ct_model.errors import UserError

from ct_data.config import DataConfigError, SourceConfig

logger = logging.getLogger("ct_data")

_EXT_FORMAT = {
    ".jsonl": "json",
    ".json": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}
_COMPRESSED = (".gz", ".zst", ".bz2", ".xz", ".lz4")
_GLOB_CHARS = re.compile(r"[*?\[]")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

# Why a document was not used; counted per source and reported by the loader.
SKIP_EMPTY = "empty"  # missing (None), empty or whitespace-only
SKIP_NON_STRING = "non_string"  # a number, list, dict ... where text was expected
SKIP_UNDECODABLE = "undecodable"  # bytes that are not UTF-8, lone surrogates, U+FFFD replacement chars
SKIP_BAD_MESSAGES = "bad_messages"  # SFT: not a list of {role, content} with a non-empty assistant turn
SKIP_TOO_LONG = "too_long"  # SFT: longer than the limit, with the "drop" policy
SKIP_NO_TARGET = "no_target"  # SFT: after truncation no assistant token is left


class DataSourceError(UserError, RuntimeError):
    """Reading a source failed (missing file, unreadable file, empty source, network)."""


def _format_of(path: str, override: str | None) -> str | None:
    if override:
        return override
    p = path.lower()
    for c in _COMPRESSED:
        if p.endswith(c):
            p = p[: -len(c)]
    return _EXT_FORMAT.get(os.path.splitext(p)[1])


def resolve_files(src: SourceConfig) -> tuple[str, list[str]] | None:
    """For a local or ``hf://`` source, the datasets builder name and the sorted file list.

    Returns None for a hub dataset name. Raises DataConfigError naming the source for a missing
    file, a glob matching nothing, or files of an unknown or mixed format.
    """
    path = src.path
    if path.startswith("hf://"):
        fmt = _format_of(path, src.file_format)
        if fmt is None:
            raise DataConfigError(f"source {src.name!r}: field 'path' {path!r}: cannot tell the file format; "
                                  f"set file_format to one of json, parquet, text")
        return fmt, [path]
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(expanded)
            for f in names
            if _format_of(f, None) is not None and not f.startswith(".")
        )
        if not files:
            raise DataConfigError(f"source {src.name!r}: field 'path': directory {path!r} holds no "
                                  f"parquet/jsonl/json/txt file")
    elif os.path.isfile(expanded):
        files = [expanded]
    elif _GLOB_CHARS.search(path):
        files = sorted(f for f in _glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise DataConfigError(f"source {src.name!r}: field 'path': no file matches {path!r}")
    elif (
        _HUB_NAME.match(path)
        and not path.startswith((".", "/", "~"))
        and _format_of(path, None) is None
    ):
        return None  # a hub dataset name
    else:
        raise DataConfigError(f"source {src.name!r}: field 'path': file {path!r} does not exist")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:  # datasets would fail on it with a bare StopIteration
        raise DataSourceError(f"source {src.name!r}: {empty[0]} is empty (0 bytes){_more(empty)}; fill it, or "
                              "leave it out of the source's path")
    formats = {_format_of(f, src.file_format) for f in files}
    if None in formats:
        bad = [f for f in files if _format_of(f, src.file_format) is None][:3]
        raise DataConfigError(f"source {src.name!r}: field 'path': unknown file format for {bad}; "
                              f"set file_format to one of json, parquet, text")
    if len(formats) > 1:
        raise DataConfigError(f"source {src.name!r}: field 'path': {path!r} mixes formats {sorted(formats)}; "
                              f"use one source per format")
    return formats.pop(), files


def _more(files: list[str]) -> str:
    return f" (and {len(files) - 1} more)" if len(files) > 1 else ""


def open_dataset(src: SourceConfig):
    """A streaming ``datasets.IterableDataset`` over the source's records."""
    from ct_data.prepared import is_prepared

    if is_prepared(src):
        raise DataConfigError(f"source {src.name!r}: {src.path!r} is prepared (indexed token shards): it holds "
                              f"token ids, not text records; the pretraining loader reads it (ct_data.PreparedSource)")
    import datasets

    datasets.disable_progress_bars()
    resolved = resolve_files(src)
    try:
        if resolved is not None:
            fmt, files = resolved
            kwargs: dict[str, Any] = {}
            if fmt == "text":
                # Invalid bytes become U+FFFD, which the extractor counts as undecodable.
                kwargs = {"sample_by": src.text_sample_by, "encoding_errors": "replace"}
            elif fmt == "json":
                # Likewise for JSON lines: datasets decodes (and so replaces) only for an encoding
                # spelled other than "utf-8"; "utf_8" is the same codec. Without it one non-UTF-8
                # document (a Latin-1 line) stops the run instead of being skipped and counted.
                kwargs = {"encoding": "utf_8", "encoding_errors": "replace"}
            return datasets.load_dataset(fmt, data_files=files, split="train", streaming=True, **kwargs)
        data_files = list(src.data_files) if isinstance(src.data_files, tuple) else src.data_files
        return datasets.load_dataset(src.path, name=src.subset, split=src.split, streaming=True,
                                     data_files=data_files, revision=src.revision)
    except DataConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise DataSourceError(f"source {src.name!r}: cannot open {src.path!r}: {type(e).__name__}: {e}") from e


def iter_record_batches(src: SourceConfig, ds, start: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Records from position ``start`` of one pass over the source, as lists of dicts."""
    it = ds.skip(start) if start > 0 else ds
    try:
        for cols in it.iter(batch_size=batch_size):
            keys = list(cols)
            n = len(cols[keys[0]]) if keys else 0
            yield [{k: cols[k][i] for k in keys} for i in range(n)]
    except Exception as e:  # noqa: BLE001 - re-raised with the source named
        raise DataSourceError(f"source {src.name!r}: error while reading {src.path!r}: "
                              f"{type(e).__name__}: {e}") from e


_CHECKED: dict[tuple[str, int, int], int] = {}  # (file, size, mtime) -> records, checked this process
MAX_REPORTED = 5


def check_local_records(src: SourceConfig) -> int:
    """Parse every line of a local JSON-lines source before training starts; return its records.

    ``datasets`` parses JSON files in blocks, so one malformed line would stop a run when the
    loader first reaches it, possibly hours in. This streaming parse finds such lines up front
    and names them (file:line). Records whose text is empty or not a string are not errors: the
    loader skips them and counts them by reason (loader stats, the run's summary.json)."""
    resolved = resolve_files(src)
    if resolved is None or resolved[0] != "json" or src.path.startswith("hf://"):
        return 0  # hub datasets, parquet (typed) and text files cannot hold a malformed JSON line
    total, bad = 0, []
    for path in resolved[1]:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in _CHECKED:
            _CHECKED[key] = _count_json_lines(src, path, bad)
        total += _CHECKED[key]
    if bad:
        shown = "; ".join(bad[:MAX_REPORTED]) + (f"; ... ({len(bad)} in all)" if len(bad) > MAX_REPORTED else "")
        raise DataSourceError(f"source {src.name!r}: {len(bad)} malformed JSON record(s): {shown}. "
                              "Fix or remove those lines; nothing was trained")
    return total


def _count_json_lines(src: SourceConfig, path: str, bad: list[str]) -> int:
    import gzip
    import json

    opener = gzip.open if path.endswith(".gz") else open
    count = 0
    # Undecodable bytes are not malformed JSON: read as U+FFFD, the loader skips those documents.
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        if f.read(4096).lstrip().startswith("["):
            return 0  # one JSON array (not JSON lines): datasets parses it whole, at open time
        f.seek(0)
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    bad.append(f"{path}:{line_no}: {err.msg} (column {err.colno})")
                    continue
                if not isinstance(record, dict):
                    bad.append(f"{path}:{line_no}: a JSON {type(record).__name__}, not an object")
                    continue
                count += 1
        except UnicodeDecodeError as err:
            bad.append(f"{path}: not UTF-8 near byte {err.start}")
    return count


def first_record(src: SourceConfig, ds) -> dict[str, Any]:
    for batch in iter_record_batches(src, ds, 0, 1):
        if batch:
            return batch[0]
    raise DataSourceError(f"source {src.name!r}: {src.path!r} holds no records")


def check_fields(src: SourceConfig, record: dict[str, Any], fields: list[str]) -> None:
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataConfigError(f"source {src.name!r}: field {missing[0]!r} not found in the records of "
                              f"{src.path!r}; available fields: {sorted(record)}")


# ----------------------------------------------------------------------------- extraction
def clean_text(value: Any, *, allow_replacement_char: bool = False) -> str | tuple[str]:
    """The text of a document, or a 1-tuple holding the skip reason."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return (SKIP_UNDECODABLE,)
    if value is None:
        return (SKIP_EMPTY,)
    if not isinstance(value, str):
        return (SKIP_NON_STRING,)
    if not value.strip():
        return (SKIP_EMPTY,)
    if not value.isascii():
        if not allow_replacement_char and "\ufffd" in value:
            return (SKIP_UNDECODABLE,)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return (SKIP_UNDECODABLE,)
    return value


def extract_text(src: SourceConfig, record: dict[str, Any]) -> str | tuple[str]:
    if src.text_template is None:
        return clean_text(record.get(src.text_field), allow_replacement_char=src.allow_replacement_char)
    values = {}
    for f in src.template_fields():
        v = clean_text(record.get(f), allow_replacement_char=src.allow_replacement_char)
        if isinstance(v, tuple):
            return v
        values[f] = v
    return src.text_template.format_map(values)


def extract_messages(src: SourceConfig, record: dict[str, Any]) -> list[dict[str, Any]] | tuple[str]:
    """The conversation of an SFT record (not yet validated), or a skip reason."""
    if src.prompt_field is None:
        msgs = record.get(src.messages_field)
        if msgs is None:
            return (SKIP_EMPTY,)
        if not isinstance(msgs, list):
            return (SKIP_BAD_MESSAGES,)
        out = []
        for m in msgs:
            if not isinstance(m, dict):
                return (SKIP_BAD_MESSAGES,)
            c = clean_text(m.get("content"), allow_replacement_char=src.allow_replacement_char)
            if isinstance(c, tuple):
                if c[0] != SKIP_EMPTY:
                    return c
                # An empty turn of any role is kept as context; an empty assistant turn is not
                # trained (chat.render_chat). validate_messages drops a conversation that has no
                # non-empty assistant turn at all.
                c = ""
            out.append({"role": m.get("role"), "content": c})
        if src.system_prompt is not None and not (out and out[0]["role"] == "system"):
            out.insert(0, {"role": "system", "content": src.system_prompt})
        return out
    prompt = clean_text(record.get(src.prompt_field), allow_replacement_char=src.allow_replacement_char)
    if isinstance(prompt, tuple):
        return prompt
    response = clean_text(record.get(src.response_field), allow_replacement_char=src.allow_replacement_char)
    if isinstance(response, tuple):
        return response
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if src.system_prompt is not None:
        msgs.insert(0, {"role": "system", "content": src.system_prompt})
    return msgs

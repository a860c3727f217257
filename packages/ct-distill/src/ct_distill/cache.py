"""Cached teacher: top-k ids and log-probs per position, written by every process of a run.

Layout of a cache directory (``cache_layout`` has the geometry)::

    index.json                          written last; its presence is what makes the cache complete
    rows-000000-000256/part.json        this part's shards; written when its writer finished
    rows-000000-000256/shard-000000.safetensors
    rows-000256-000512/...              another process's rows of every global batch

Global sequence ``s * B + j`` is row j of step s of the loader's global batch of B sequences
(``ct_model.batch.SEQUENCE_INDEX``). Each process writes the rows its own loader yields (a
``RowBlock``) into its own part directory; ``finalize_teacher_cache`` merges the parts into the
index once all are complete, and the reader serves any global sequence, whoever wrote it.

Each shard holds ``entries`` int32 [n, seq_len, k] (a token id and its float16 log-prob packed in
32 bits: ``cache_entries``), or, with ``logprobs_dtype=float32``, ``topk_ids`` int32 +
``topk_logprobs`` float32, and ``input_hash`` int64 [n], a hash of each sequence's input_ids that
the reader checks against the batch, so a loader that drifted from the one the cache was written
for is an error instead of silent garbage. Log-probs are the teacher's log-softmax at temperature
1 over the FULL vocabulary, gathered at the ids, ids sorted by decreasing probability.

Atomicity: every file is written to a ``.tmp`` name, fsynced and renamed; ``part.json`` is written
after a part's last shard and ``index.json`` after every part. A writer that dies or raises leaves
no part.json, and the reader refuses a directory without index.json. ``resume=True`` keeps the
complete shards of a dead writer of the same rows.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors.torch import save_file

from ct_model.batch import SEQUENCE_INDEX
from ct_model.dtypes import dtypes

from .cache_entries import PACKED_DTYPES, entry_layout, pack_entries
# Errors, the hash and the reader are re-exported: ``ct_distill.cache`` is the module users import.
from .cache_layout import (FORMAT, INDEX, LAYOUT_FIELDS, PART, VERSION, CacheError, CacheMismatchError,  # noqa: F401
                           IncompleteCacheError, RowBlock, atomic_write_json, fsync_path, read_json,
                           read_shard_header, sequence_hash, shard_name, split_rows)
from .cache_reader import TeacherCacheReader  # noqa: F401
from .losses import TopK
from .teacher import OnlineTeacher

__all__ = ["CacheError", "CacheMismatchError", "IncompleteCacheError", "TeacherCacheReader",
           "TeacherCacheWriter", "finalize_teacher_cache", "sequence_hash", "wait_for_teacher_cache",
           "write_teacher_cache"]

log = logging.getLogger("ct_distill")
_LOGPROB_DTYPES = dtypes("float16", "bfloat16", "float32")
# A waiting process gives up when no part it waits for has gained a shard for this long: far above
# the time one shard takes (~1M tokens at the default size), far below "hung forever".
STALL_TIMEOUT_S = 1800.0
LOGPROBS_MEANING = "log_softmax(teacher logits, T=1) over the full vocabulary, at ids sorted by decreasing logit"


# ----------------------------------------------------------------------------- writer


class TeacherCacheWriter:
    """Appends the sequences of one row block in loader order and writes them in shards.

    ``batch_size`` (B) and ``rows`` say which global sequences the added rows are: rows
    [rows.start, rows.stop) of every global batch of B, step after step. The default (B = 1, rows
    [0, 1)) numbers the added sequences 0, 1, 2, ... as a one-process loader does.

    Use as a context manager (or call ``close()``): the part's ``part.json`` is written only on a
    clean exit, and ``index.json`` too when the block is the whole batch (one writer). ``teacher``
    is a JSON-able description of the teacher (``OnlineTeacher.identity()``).
    """

    def __init__(self, root: str | os.PathLike, *, seq_len: int, k: int, vocab_size: int,
                 teacher: Mapping[str, Any], seqs_per_shard: int | None = None,
                 logprobs_dtype: torch.dtype = torch.float16, batch_size: int = 1,
                 rows: range | None = None, overwrite: bool = False, resume: bool = False):
        dtype_name = str(logprobs_dtype).removeprefix("torch.")
        if dtype_name not in _LOGPROB_DTYPES:
            raise ValueError(f"logprobs_dtype must be one of {sorted(_LOGPROB_DTYPES)}, got {dtype_name}")
        for name, value in (("seq_len", seq_len), ("k", k), ("vocab_size", vocab_size), ("batch_size", batch_size)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        if vocab_size > 2**31 - 1:
            raise ValueError("vocab_size does not fit int32 ids")
        rows = range(0, batch_size) if rows is None else rows
        self.block = RowBlock(batch_size, rows.start, rows.stop)
        self.root = Path(root)
        self.part_dir = self.root / self.block.dirname
        self.packed = dtype_name in PACKED_DTYPES
        if self.packed:
            entry_layout(vocab_size)  # a vocabulary too large to pack is refused now, not at the first shard
        self.logprobs_dtype = logprobs_dtype
        self.meta = {"seq_len": seq_len, "k": k, "vocab_size": vocab_size,
                     "entry": "packed32" if self.packed else "planes", "logprobs_dtype": dtype_name,
                     "batch_size": batch_size, "teacher": _plain(teacher)}
        bytes_per_seq = seq_len * k * (4 if self.packed else 4 + logprobs_dtype.itemsize) + 8
        self.seqs_per_shard = seqs_per_shard or max(1, (256 << 20) // bytes_per_seq)
        self.shards: list[dict[str, Any]] = []
        self.next_pos = 0  # positions (rows of this block) held by complete shards
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffered = 0
        self._closed = False
        self._prepare(overwrite, resume)

    @property
    def next_seq(self) -> int:
        """The global sequence the next added row must be (for the default layout: rows so far)."""
        return self.block.global_index(self.next_pos + self._buffered)

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        index = self.root / INDEX
        if index.exists():
            # A part writer resuming beside a finished index only re-adopts its complete shards
            # (another process may have finalised while this one was starting).
            if not overwrite and (self.block.whole or not resume):
                raise CacheError(f"{self.root} already holds a complete cache (pass overwrite=True)")
            if overwrite:
                index.unlink(missing_ok=True)  # from here on the old cache is invalid, whatever happens next
        if self.block.whole:  # one writer owns the whole directory: parts of other layouts are stale
            remove_stale(self.root, keep={self.block.dirname})
        self.part_dir.mkdir(exist_ok=True)
        for tmp in self.part_dir.glob("*.tmp"):
            tmp.unlink()
        (self.part_dir / PART).unlink(missing_ok=True)
        shards = sorted(self.part_dir.glob("shard-*.safetensors"))
        if resume and not overwrite:
            shards = self._adopt(shards)
        for stale in shards:
            stale.unlink()

    def _adopt(self, files: list[Path]) -> list[Path]:
        """Keep the leading run of complete shards that match this writer; return the others."""
        for i, path in enumerate(files):
            if path.name != shard_name(i):
                return files[i:]
            try:
                meta, _ = read_shard_header(path)
            except CacheError:
                return files[i:]  # cut short by a kill: rewritten
            if meta != self._shard_meta(self.next_pos, int(meta.get("num_seqs", -1))):
                return files[i:]
            self.shards.append(self._shard_entry(path, meta))
            self.next_pos += int(meta["num_seqs"])
        return []

    def add(self, input_ids: torch.Tensor, topk: TopK | tuple[torch.Tensor, torch.Tensor],
            sequence_index: torch.Tensor | None = None) -> None:
        """Append the next rows: input_ids [n, T] and the teacher's TopK [n, T, k]. With
        ``sequence_index`` [n] (the loader's), the rows must be the block's next global sequences."""
        if self._closed:
            raise CacheError("writer is closed")
        ids, logprobs = topk
        seq_len, k = self.meta["seq_len"], self.meta["k"]
        if input_ids.dim() != 2 or input_ids.shape[1] != seq_len:
            raise CacheMismatchError("seq_len", f"input_ids {tuple(input_ids.shape)} do not have "
                                     f"seq_len={seq_len}")
        if tuple(ids.shape) != (input_ids.shape[0], seq_len, k) or ids.shape != logprobs.shape:
            raise CacheMismatchError("k", f"top-k ids {tuple(ids.shape)} / logprobs "
                                     f"{tuple(logprobs.shape)} are not [B, {seq_len}, {k}]")
        if sequence_index is not None:
            self._check_sequence_index(sequence_index)
        if self.packed:
            entry = {"entries": pack_entries(ids, logprobs, vocab_size=self.meta["vocab_size"],
                                             dtype=self.logprobs_dtype)}
        else:
            entry = {"topk_ids": ids.detach().to("cpu", torch.int32),
                     "topk_logprobs": logprobs.detach().to("cpu", self.logprobs_dtype)}
        entry["input_hash"] = sequence_hash(input_ids)
        self._buffer.append(entry)
        self._buffered += input_ids.shape[0]
        while self._buffered >= self.seqs_per_shard:
            self._flush(self.seqs_per_shard)

    def _check_sequence_index(self, sequence_index: torch.Tensor) -> None:
        first = self.next_pos + self._buffered
        got = [int(s) for s in sequence_index.reshape(-1).tolist()]
        want = [self.block.global_index(first + i) for i in range(len(got))]
        if got != want:
            raise CacheMismatchError("sequence_index", f"{self.part_dir}: rows with sequence_index "
                                     f"{got[:4]}... added where rows {self.block.start}..{self.block.stop - 1} "
                                     f"of a batch of {self.block.batch_size} expect {want[:4]}... (the "
                                     f"loader's batch size or rank does not match the writer's)")

    def _shard_meta(self, first: int, num_seqs: int) -> dict[str, str]:
        return {"format": FORMAT, "version": str(VERSION), "first": str(first), "num_seqs": str(num_seqs),
                "rows": f"{self.block.start}:{self.block.stop}",
                **{key: str(self.meta[key]) for key in LAYOUT_FIELDS},
                "teacher": _teacher_json(self.meta["teacher"])}

    def _shard_entry(self, path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
        return {"file": f"{self.block.dirname}/{path.name}", "first": int(meta["first"]),
                "num_seqs": int(meta["num_seqs"]), "bytes": path.stat().st_size}

    def _flush(self, n: int) -> None:
        tensors = {name: torch.cat([b[name] for b in self._buffer]) for name in self._buffer[0]}
        rest = {name: t[n:] for name, t in tensors.items()}
        self._buffer = [rest] if rest["input_hash"].numel() else []
        self._buffered = rest["input_hash"].numel()
        path = self.part_dir / shard_name(len(self.shards))
        meta = self._shard_meta(self.next_pos, n)
        tmp = path.with_name(path.name + ".tmp")
        save_file({name: t[:n].contiguous() for name, t in tensors.items()}, str(tmp), metadata=meta)
        fsync_path(tmp)
        os.replace(tmp, path)
        self.shards.append(self._shard_entry(path, meta))
        self.next_pos += n

    def close(self, exhausted: bool = False, stats: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the remaining rows and ``part.json`` (then ``index.json`` when this writer holds the
        whole batch). ``exhausted``: the loader ended before the rows wanted (recorded, so that a
        finaliser does not wait for rows that will never come). Returns the index or the part."""
        if self._closed:
            raise CacheError("writer is already closed")
        if self._buffered:
            self._flush(self._buffered)
        self._closed = True
        part = {"format": FORMAT, "version": VERSION, **self.meta, "dir": self.block.dirname,
                "rows": [self.block.start, self.block.stop], "num_seqs": self.next_pos,
                "exhausted": exhausted, "shards": self.shards, **dict(stats or {})}
        atomic_write_json(self.part_dir / PART, part)
        if self.block.whole:
            return write_index(self.root, [part])
        return part

    def abort(self) -> None:
        """Stop without part.json (the part stays incomplete; ``resume`` keeps its shards)."""
        self._closed = True
        self._buffer = []

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()


def _plain(obj: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(dict(obj)))


def _teacher_json(teacher: Mapping[str, Any]) -> str:
    return json.dumps(teacher, sort_keys=True)


# ----------------------------------------------------------------------------- index


def write_index(root: Path, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge complete parts (their part.json) into index.json, atomically. The parts must tile the
    rows of the batch and agree on every layout field and the teacher."""
    first = parts[0]
    for part in parts[1:]:
        for key in (*LAYOUT_FIELDS, "teacher"):
            if part[key] != first[key]:
                raise CacheMismatchError(key, f"{root / part['dir'] / PART}: {key}={part[key]!r} but "
                                         f"{first['dir']} has {first[key]!r} (parts of different caches)")
    blocks = [RowBlock(first["batch_size"], *part["rows"]) for part in parts]
    # The number of leading global sequences every part holds: what the reader can serve.
    num_seqs = min(b.global_index(p["num_seqs"]) for b, p in zip(blocks, parts))
    total_bytes = sum(s["bytes"] for p in parts for s in p["shards"])
    entry_bytes = 4 if first["entry"] == "packed32" else 4 + _LOGPROB_DTYPES[first["logprobs_dtype"]].itemsize
    ids_bits, logprob_bits = (entry_layout(first["vocab_size"]) if first["entry"] == "packed32"
                              else (32, 8 * _LOGPROB_DTYPES[first["logprobs_dtype"]].itemsize))
    tokens = sum(p["num_seqs"] for p in parts) * first["seq_len"]
    index = {"format": FORMAT, "version": VERSION, **{key: first[key] for key in (*LAYOUT_FIELDS, "teacher")},
             "ids_bits": ids_bits, "logprob_bits": logprob_bits, "bytes_per_entry": entry_bytes,
             "logprobs": LOGPROBS_MEANING, "num_seqs": num_seqs, "num_tokens": num_seqs * first["seq_len"],
             "exhausted": any(p.get("exhausted") for p in parts), "bytes": total_bytes,
             "bytes_per_token": total_bytes / tokens if tokens else None,
             "parts": [{key: p[key] for key in ("dir", "rows", "num_seqs", "shards")} for p in parts]}
    atomic_write_json(root / INDEX, index)
    return index


def remove_stale(root: Path, keep: set[str]) -> list[str]:
    """Delete part directories not in ``keep`` (another layout's, never indexed) and shard files of
    the version-1 layout at the top level. Returns what was removed."""
    removed = []
    for path in sorted(root.glob("rows-*")):
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path)
            removed.append(path.name)
    for path in sorted(root.glob("shard-*.safetensors")):
        path.unlink()
        removed.append(path.name)
    return removed


# ----------------------------------------------------------------------------- waiting


def _progress_marks(paths: Iterable[Path]) -> tuple:
    """Directory modification times: a shard's rename into a part directory changes its time, so
    an unchanged tuple means no writer finished a shard (times are compared with each other only,
    never with this host's clock, so clock skew between nodes does not matter)."""
    marks = []
    for path in paths:
        try:
            marks.append(path.stat().st_mtime_ns)
        except FileNotFoundError:
            marks.append(None)
    return tuple(marks)


def _wait(done: Callable[[], list[str]], watched: Callable[[], list[Path]], what: str, *,
          stall_timeout: float, poll: float) -> None:
    """Poll ``done()`` (the names still missing) until it is empty; CacheError once nothing in
    ``watched()`` has changed for ``stall_timeout`` seconds."""
    marks, changed, said = _progress_marks(watched()), time.monotonic(), time.monotonic()
    while missing := done():
        time.sleep(poll)
        now, current = time.monotonic(), _progress_marks(watched())
        if current != marks:
            marks, changed = current, now
        elif now - changed > stall_timeout:
            raise CacheError(f"{what}: no progress for {stall_timeout:g} s; still missing "
                             f"{', '.join(missing[:8])} (a writer died or hung; rerun to resume)")
        if now - said > 300:
            log.info("%s: waiting for %s", what, ", ".join(missing[:8]))
            said = now


def finalize_teacher_cache(root: str | os.PathLike, *, batch_size: int, parts: int, num_seqs: int | None = None,
                           expect: Mapping[str, Any] | None = None, stall_timeout: float = STALL_TIMEOUT_S,
                           poll: float = 2.0) -> dict[str, Any]:
    """Wait until each of the ``parts`` row blocks of a batch of ``batch_size`` has a complete part
    (its part.json, holding the rows below ``num_seqs`` unless its loader ran out, and equal to
    ``expect`` (e.g. this process's part) in every layout field and the teacher), then write
    index.json and remove the parts of other layouts. A part.json that does not qualify is one left
    by an earlier run, about to be replaced by its writer: waited for, not used.

    File-based, so the processes that finished early hold no collective (whose timeout would end
    the job) while the others still write; it gives up only when no missing part gains a shard for
    ``stall_timeout`` seconds."""
    root = Path(root)
    blocks = split_rows(batch_size, parts)
    found: dict[str, dict] = {}
    same = [key for key in (*LAYOUT_FIELDS, "teacher") if expect is not None and key in expect]

    def missing() -> list[str]:
        for block in blocks:
            path = root / block.dirname / PART
            if block.dirname not in found and path.is_file():
                part = read_json(path)
                want = block.positions_below(num_seqs) if num_seqs is not None else 0
                current = all(part.get(key) == expect[key] for key in same)
                if current and (part["num_seqs"] >= want or part.get("exhausted")):
                    found[block.dirname] = part
        return [b.dirname for b in blocks if b.dirname not in found]

    _wait(missing, lambda: [root, *(root / b.dirname for b in blocks)], f"{root}: finishing the cache",
          stall_timeout=stall_timeout, poll=poll)
    index = write_index(root, [found[b.dirname] for b in blocks])
    removed = remove_stale(root, keep={b.dirname for b in blocks})
    if removed:
        log.info("%s: removed %d stale part(s) of another layout: %s", root, len(removed), ", ".join(removed[:8]))
    return index


def wait_for_teacher_cache(root: str | os.PathLike, *, stall_timeout: float = STALL_TIMEOUT_S,
                           poll: float = 2.0) -> None:
    """Wait for index.json (written by the finalising process) while the parts make progress."""
    root = Path(root)
    _wait(lambda: [] if (root / INDEX).is_file() else [INDEX],
          lambda: [root, *sorted(p for p in root.glob("rows-*") if p.is_dir())],
          f"{root}: waiting for the cache", stall_timeout=stall_timeout, poll=poll)


# ----------------------------------------------------------------------------- end to end


def _block_of(batches, batch_size: int | None, rows: range | None) -> tuple[int, range]:
    """The layout the batches follow: explicit, else a ct-data loader's own (``batch_size``,
    ``rows``), else one process numbering sequences 0, 1, 2, ..."""
    batch_size = batch_size or getattr(batches, "batch_size", None)
    if batch_size is None:
        return 1, range(0, 1)
    rows = rows if rows is not None else getattr(batches, "rows", None)
    return batch_size, range(0, batch_size) if rows is None else range(rows.start, rows.stop)


def write_teacher_cache(teacher: OnlineTeacher, batches: Iterable[Mapping[str, torch.Tensor]],
                        root: str | os.PathLike, *, k: int, seq_len: int | None = None,
                        max_sequences: int | None = None, seqs_per_shard: int | None = None,
                        logprobs_dtype: torch.dtype = torch.float16, overwrite: bool = False,
                        resume: bool = False, batch_size: int | None = None, rows: range | None = None,
                        rows_per_forward: int | None = None) -> dict[str, Any]:
    """Run ``teacher`` once over ``batches`` (one process's packed batches, in loader order, from
    step 0) and write its part of the cache (the whole cache when the batches are the whole
    global batch). ``max_sequences`` bounds the GLOBAL sequence index: rows at or above it are not
    written. ``rows_per_forward`` splits a batch into teacher forwards of that many rows.

    Returns the index (or this process's part) plus write statistics (``tokens_per_second``,
    ``bytes_per_token``). With ``resume`` the rows already held by complete shards are skipped (the
    batches must still start at step 0)."""
    batch_size, rows = _block_of(batches, batch_size, rows)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no batches to cache")
    seq_len = seq_len or first["input_ids"].shape[1]
    writer = TeacherCacheWriter(root, seq_len=seq_len, k=k, vocab_size=teacher.vocab_size,
                                teacher=teacher.identity(), seqs_per_shard=seqs_per_shard,
                                logprobs_dtype=logprobs_dtype, batch_size=batch_size, rows=rows,
                                overwrite=overwrite, resume=resume)
    limit = writer.block.positions_below(max_sequences) if max_sequences is not None else None
    skip, seen, written, exhausted = writer.next_pos, 0, 0, False
    start = time.perf_counter()
    with writer:
        # Resuming a complete part reads nothing more; otherwise the batches are replayed from step 0
        # and the rows already held are skipped without running the teacher.
        if limit is None or skip < limit:
            for batch in _chain(first, iterator):
                n = batch["input_ids"].shape[0]
                hi = n if limit is None else min(n, limit - seen)
                written += _annotate_rows(teacher, writer, batch, k, max(0, skip - seen), hi, rows_per_forward)
                seen += n
                if limit is not None and seen >= limit:
                    break
            else:
                exhausted = limit is not None
        seconds = time.perf_counter() - start
        stats = {"write_seconds": seconds, "tokens_written": written * seq_len,
                 "tokens_per_second": written * seq_len / seconds if seconds > 0 else None}
        result = writer.close(exhausted=exhausted, stats=stats)
    own = sum(s["bytes"] for s in writer.shards) / (writer.next_pos * seq_len) if writer.next_pos else None
    return {**result, **stats, "part_bytes_per_token": own,
            "bytes_per_token": result.get("bytes_per_token") or own}


def _annotate_rows(teacher: OnlineTeacher, writer: TeacherCacheWriter, batch: Mapping[str, torch.Tensor],
                   k: int, lo: int, hi: int, rows_per_forward: int | None) -> int:
    """Run the teacher over rows [lo, hi) of ``batch`` and add them; returns the rows added.

    Forwards cover the same row groups [a, a + rows_per_forward) whatever ``lo`` is, so a resumed
    writer computes the same arithmetic (same shapes) as an uninterrupted one and writes the same
    bits; the rows of a group below ``lo`` are computed and dropped."""
    step = rows_per_forward or max(hi, 1)
    for a in range(0, hi, step):
        b = min(hi, a + step)
        if b <= lo:
            continue
        part = {key: batch[key][a:b] for key in ("input_ids", "position_ids", "document_ids", SEQUENCE_INDEX)
                if batch.get(key) is not None}
        topk = teacher.topk(part["input_ids"], k, part.get("position_ids"), part.get("document_ids"))
        keep = slice(max(lo - a, 0), b - a)
        index = part.get(SEQUENCE_INDEX)
        writer.add(part["input_ids"][keep], TopK(topk.ids[keep], topk.logprobs[keep]),
                   None if index is None else index[keep])
    return max(hi - lo, 0)


def _chain(first, rest):
    yield first
    yield from rest

"""Cached teacher: top-k ids and log-probs per position, in shards keyed by loader position.

Layout of a cache directory::

    index.json                 written last; its presence is what makes the cache complete
    shard-000000.safetensors   sequences [first_seq, first_seq + num_seqs)
    shard-000001.safetensors   ...

Each shard holds ``topk_ids`` int32 [n, seq_len, k], ``topk_logprobs`` float16 (or bfloat16 /
float32) [n, seq_len, k] and ``input_hash`` int64 [n], a hash of each sequence's input_ids that
the reader checks against the batch, so a loader that drifted from the one the cache was written
for is an error instead of silent garbage. Log-probs are the teacher's log-softmax at temperature
1 over the FULL vocabulary, gathered at the ids, ids sorted by decreasing probability.

Sequences are numbered by the global loader position: sequence i is the i-th packed sequence the
loader yields (for a global batch of G sequences, step s covers [s * G, (s + 1) * G)). The
trainer knows that number from the step, so resuming needs nothing from the cache but ``get``.

Atomicity: every file is written to a ``.tmp`` name, fsynced and renamed; the index is renamed
into place after every shard. A writer that dies or raises leaves no index.json, and the reader
refuses a directory without one. ``resume=True`` keeps the complete shards of a dead writer.
"""

from __future__ import annotations

import bisect
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .losses import TopK
from .teacher import TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS, OnlineTeacher

from ct_model.errors import UserError

FORMAT = "ct-distill/teacher-topk-cache"
VERSION = 1
INDEX = "index.json"
from ct_model.batch import SEQUENCE_INDEX  # noqa: E402 - batch key: global loader position of each row
_LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FIELDS = ("seq_len", "k", "vocab_size")


class CacheError(UserError, RuntimeError):
    """A teacher cache is unusable."""


class IncompleteCacheError(CacheError):
    """The directory has no index.json: the writer never finished."""


class CacheMismatchError(CacheError):
    """The cache does not match what the reader expects; ``field`` names what differs."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ----------------------------------------------------------------------------- sequence hash

_MOD = (1 << 31) - 1
_BASES = (1_000_003, 998_244_353 % _MOD)
_POWERS: dict[tuple[int, int], torch.Tensor] = {}


def _powers(base: int, n: int) -> torch.Tensor:
    key = (base, n)
    if key not in _POWERS:
        values, x = [], 1
        for _ in range(n):
            values.append(x)
            x = x * base % _MOD
        _POWERS[key] = torch.tensor(values, dtype=torch.int64)
    return _POWERS[key]


def sequence_hash(input_ids: torch.Tensor) -> torch.Tensor:
    """A deterministic 62-bit hash per row of ``input_ids`` [n, T] (int64 [n]), torch-only."""
    ids = input_ids.detach().to("cpu", torch.int64) % _MOD
    n, t = ids.shape
    parts = [((ids * _powers(b, t)) % _MOD).sum(-1) % _MOD for b in _BASES]
    return parts[0] * (1 << 31) + parts[1]


# ----------------------------------------------------------------------------- atomic files


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


# ----------------------------------------------------------------------------- writer


class TeacherCacheWriter:
    """Appends sequences in loader order and writes shards of ``seqs_per_shard`` sequences.

    Use as a context manager (or call ``close()``): the index is written only on a clean exit.
    ``teacher`` is a JSON-able description of the teacher (``OnlineTeacher.identity()``).
    """

    def __init__(self, root: str | os.PathLike, *, seq_len: int, k: int, vocab_size: int,
                 teacher: Mapping[str, Any], seqs_per_shard: int | None = None,
                 logprobs_dtype: torch.dtype = torch.float16, overwrite: bool = False,
                 resume: bool = False):
        dtype_name = str(logprobs_dtype).removeprefix("torch.")
        if dtype_name not in _LOGPROB_DTYPES:
            raise ValueError(f"logprobs_dtype must be one of {sorted(_LOGPROB_DTYPES)}, got {dtype_name}")
        for name, value in (("seq_len", seq_len), ("k", k), ("vocab_size", vocab_size)):
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds vocab_size={vocab_size}")
        if vocab_size > 2**31 - 1:
            raise ValueError("vocab_size does not fit int32 ids")
        self.root = Path(root)
        self.meta = {"seq_len": seq_len, "k": k, "vocab_size": vocab_size,
                     "teacher": json.loads(json.dumps(dict(teacher))),
                     "ids_dtype": "int32", "logprobs_dtype": dtype_name}
        self.logprobs_dtype = logprobs_dtype
        bytes_per_seq = seq_len * k * (4 + logprobs_dtype.itemsize) + 8
        self.seqs_per_shard = seqs_per_shard or max(1, (256 << 20) // bytes_per_seq)
        self.shards: list[dict[str, Any]] = []
        self.next_seq = 0
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffered = 0
        self._closed = False
        self._seconds = 0.0
        self._prepare(overwrite, resume)

    def _prepare(self, overwrite: bool, resume: bool) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        index = self.root / INDEX
        if index.exists():
            if not overwrite:
                raise CacheError(f"{self.root} already holds a complete cache (pass overwrite=True)")
            index.unlink()  # from here on the old cache is invalid, whatever happens next
        for tmp in self.root.glob("*.tmp"):
            tmp.unlink()
        shards = sorted(self.root.glob("shard-*.safetensors"))
        if resume and not overwrite:
            shards = self._adopt(shards)
        for stale in shards:
            stale.unlink()

    def _adopt(self, files: list[Path]) -> list[Path]:
        """Keep the leading run of complete shards that match this writer; return the others."""
        for i, path in enumerate(files):
            if path.name != _shard_name(i):
                return files[i:]
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            entry = _shard_entry(path, meta)
            same = all(str(self.meta[k]) == meta.get(k) for k in ("seq_len", "k", "vocab_size", "logprobs_dtype"))
            if not same or meta.get("teacher") != json.dumps(self.meta["teacher"], sort_keys=True) \
                    or entry["first_seq"] != self.next_seq:
                return files[i:]
            self.shards.append(entry)
            self.next_seq += entry["num_seqs"]
        return []

    def add(self, input_ids: torch.Tensor, topk: TopK | tuple[torch.Tensor, torch.Tensor]) -> None:
        """Append the next sequences: input_ids [B, T] and the teacher's TopK [B, T, k]."""
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
        self._buffer.append((ids.detach().to("cpu", torch.int32),
                             logprobs.detach().to("cpu", self.logprobs_dtype),
                             sequence_hash(input_ids)))
        self._buffered += input_ids.shape[0]
        while self._buffered >= self.seqs_per_shard:
            self._flush(self.seqs_per_shard)

    def _flush(self, n: int) -> None:
        ids = torch.cat([b[0] for b in self._buffer])
        logprobs = torch.cat([b[1] for b in self._buffer])
        hashes = torch.cat([b[2] for b in self._buffer])
        rest = (ids[n:], logprobs[n:], hashes[n:])
        self._buffer = [rest] if rest[2].numel() else []
        self._buffered = rest[2].numel()
        index = len(self.shards)
        path = self.root / _shard_name(index)
        meta = {"format": FORMAT, "first_seq": str(self.next_seq), "num_seqs": str(n),
                **{k: str(self.meta[k]) for k in ("seq_len", "k", "vocab_size", "logprobs_dtype")},
                "teacher": json.dumps(self.meta["teacher"], sort_keys=True)}
        tmp = path.with_name(path.name + ".tmp")
        save_file({"topk_ids": ids[:n].contiguous(), "topk_logprobs": logprobs[:n].contiguous(),
                   "input_hash": hashes[:n].contiguous()}, str(tmp), metadata=meta)
        _fsync_path(tmp)
        os.replace(tmp, path)
        self.shards.append(_shard_entry(path, meta))
        self.next_seq += n

    def close(self) -> dict[str, Any]:
        """Write the remaining sequences and the index (atomically, last). Returns the index."""
        if self._closed:
            raise CacheError("writer is already closed")
        if self._buffered:
            self._flush(self._buffered)
        self._closed = True
        num_seqs = self.next_seq
        total_bytes = sum(s["bytes"] for s in self.shards)
        tokens = num_seqs * self.meta["seq_len"]
        index = {"format": FORMAT, "version": VERSION, **self.meta,
                 "logprobs": "log_softmax(teacher logits, T=1) over the full vocabulary, at ids "
                             "sorted by decreasing logit",
                 "num_seqs": num_seqs, "num_tokens": tokens, "bytes": total_bytes,
                 "bytes_per_token": total_bytes / tokens if tokens else None,
                 "shards": self.shards}
        _atomic_write_bytes(self.root / INDEX, json.dumps(index, indent=1).encode())
        return index

    def abort(self) -> None:
        """Stop without an index (the directory stays an incomplete cache)."""
        self._closed = True
        self._buffer = []

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _shard_entry(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    return {"file": path.name, "first_seq": int(meta["first_seq"]), "num_seqs": int(meta["num_seqs"]),
            "bytes": path.stat().st_size}


def write_teacher_cache(teacher: OnlineTeacher, batches: Iterable[Mapping[str, torch.Tensor]],
                        root: str | os.PathLike, *, k: int, seq_len: int | None = None,
                        max_sequences: int | None = None, seqs_per_shard: int | None = None,
                        logprobs_dtype: torch.dtype = torch.float16, overwrite: bool = False,
                        resume: bool = False) -> dict[str, Any]:
    """Run ``teacher`` once over ``batches`` (the loader's packed batches, in loader order, from
    sequence 0) and write the cache. Returns the index plus write statistics
    (``tokens_per_second``, ``bytes_per_token``). With ``resume`` the sequences already held by
    complete shards are skipped (the batches must still start at sequence 0)."""
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no batches to cache")
    seq_len = seq_len or first["input_ids"].shape[1]
    writer = TeacherCacheWriter(root, seq_len=seq_len, k=k, vocab_size=teacher.vocab_size,
                                teacher=teacher.identity(), seqs_per_shard=seqs_per_shard,
                                logprobs_dtype=logprobs_dtype, overwrite=overwrite, resume=resume)
    skip, seen, written = writer.next_seq, 0, 0
    start = time.perf_counter()
    with writer:
        for batch in _chain(first, iterator):
            ids = batch["input_ids"]
            rows = slice(max(0, skip - seen), ids.shape[0])
            if max_sequences is not None:
                rows = slice(rows.start, min(rows.stop, max_sequences - seen))
            seen += ids.shape[0]
            if rows.start < rows.stop:
                part = {key: batch[key][rows] for key in ("input_ids", "position_ids", "document_ids")
                        if batch.get(key) is not None}
                topk = teacher.topk(part["input_ids"], k, part.get("position_ids"), part.get("document_ids"))
                writer.add(part["input_ids"], topk)
                written += rows.stop - rows.start
            if max_sequences is not None and seen >= max_sequences:
                break
    seconds = time.perf_counter() - start
    index = json.loads((Path(root) / INDEX).read_text())
    index["write_seconds"] = seconds
    index["tokens_written"] = written * seq_len
    index["tokens_per_second"] = written * seq_len / seconds if seconds > 0 else None
    return index


def _chain(first, rest):
    yield first
    yield from rest


# ----------------------------------------------------------------------------- reader


class TeacherCacheReader:
    """Serves cached top-k targets by global sequence index.

    Expected values (``seq_len``, ``k``, ``vocab_size``, ``teacher``) are checked against the
    index when given; a mismatch raises ``CacheMismatchError`` naming the field. For ``teacher``
    (e.g. ``OnlineTeacher.identity()``) the keys given are compared, except "source".
    """

    def __init__(self, root: str | os.PathLike, *, seq_len: int | None = None, k: int | None = None,
                 vocab_size: int | None = None, teacher: Mapping[str, Any] | None = None):
        self.root = Path(root)
        path = self.root / INDEX
        if not path.is_file():
            partial = len(list(self.root.glob("shard-*.safetensors"))) if self.root.is_dir() else 0
            raise IncompleteCacheError(
                f"{self.root}: no {INDEX} (incomplete cache: the writer did not finish; "
                f"{partial} shard file(s) present)"
            )
        self.index = json.loads(path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise CacheMismatchError("format", f"{path}: format {self.index.get('format')!r} "
                                     f"v{self.index.get('version')} is not {FORMAT!r} v{VERSION}")
        expected = {"seq_len": seq_len, "k": k, "vocab_size": vocab_size}
        for field, want in expected.items():
            if want is not None and self.index[field] != want:
                raise CacheMismatchError(field, f"{path}: {field} is {self.index[field]} in the cache "
                                         f"but {want} was expected")
        if teacher is not None:
            _compare_teacher(json.loads(json.dumps(dict(teacher))), self.index["teacher"], path)
        self.seq_len, self.k, self.vocab_size = (self.index[f] for f in _FIELDS)
        self.num_seqs = self.index["num_seqs"]
        self.shards = self.index["shards"]
        self._starts = [s["first_seq"] for s in self.shards]
        for s in self.shards:
            if not (self.root / s["file"]).is_file():
                raise IncompleteCacheError(f"{self.root}: shard {s['file']} listed in {INDEX} is missing")
        self._open: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.num_seqs

    def _handle(self, shard: int):
        if shard not in self._open:
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open)))
            info = self.shards[shard]
            handle = safe_open(str(self.root / info["file"]), framework="pt")
            meta = handle.metadata() or {}
            for field in _FIELDS:
                if meta.get(field) != str(self.index[field]):
                    raise CacheMismatchError(field, f"{info['file']}: {field}={meta.get(field)} but "
                                             f"the index says {self.index[field]}")
            if int(meta.get("first_seq", -1)) != info["first_seq"]:
                raise CacheMismatchError("first_seq", f"{info['file']}: first_seq "
                                         f"{meta.get('first_seq')} != index {info['first_seq']}")
            self._open[shard] = handle
        return self._open[shard]

    def _runs(self, seq: list[int]):
        """Group requested sequences into (shard, local start, local stop, output positions)."""
        i = 0
        while i < len(seq):
            s = seq[i]
            if not 0 <= s < self.num_seqs:
                raise IndexError(f"sequence index {s} outside the cache's [0, {self.num_seqs})")
            shard = bisect.bisect_right(self._starts, s) - 1
            first, n = self.shards[shard]["first_seq"], self.shards[shard]["num_seqs"]
            j = i + 1
            while j < len(seq) and seq[j] == seq[j - 1] + 1 and seq[j] < first + n:
                j += 1
            yield shard, s - first, seq[j - 1] - first + 1, (i, j)
            i = j

    def _read(self, seq_indices, names: Sequence[str]) -> list[torch.Tensor]:
        if isinstance(seq_indices, torch.Tensor):
            seq_indices = seq_indices.reshape(-1).tolist()
        seq = [int(s) for s in seq_indices]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for shard, a, b, _ in self._runs(seq):
            handle = self._handle(shard)
            for name in names:
                parts[name].append(handle.get_slice(name)[a:b])
        return [torch.cat(parts[name]) if parts[name] else torch.empty(0) for name in names]

    def get(self, seq_indices: Sequence[int] | torch.Tensor) -> TopK:
        """TopK(ids int64 [n, seq_len, k], logprobs float32 [n, seq_len, k]) for the sequences."""
        ids, logprobs = self._read(seq_indices, ("topk_ids", "topk_logprobs"))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise CacheMismatchError("vocab_size", f"{self.root}: cached token ids outside "
                                     f"[0, {self.vocab_size}) (corrupt shard?)")
        return TopK(ids.long(), logprobs.float())

    def hashes(self, seq_indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self._read(seq_indices, ("input_hash",))[0]

    def annotate(self, batch: Mapping[str, torch.Tensor],
                 seq_indices: Sequence[int] | torch.Tensor | None = None,
                 check_inputs: bool = True) -> dict:
        """A copy of ``batch`` with "teacher_topk_ids" / "teacher_topk_logprobs" for its rows.

        ``seq_indices`` (or the batch's "sequence_index" key) are the rows' global loader
        positions. With ``check_inputs`` the batch's input_ids must hash to what was cached.
        """
        if seq_indices is None:
            if SEQUENCE_INDEX not in batch:
                raise KeyError(f"pass seq_indices or put {SEQUENCE_INDEX!r} in the batch")
            seq_indices = batch[SEQUENCE_INDEX]
        input_ids = batch["input_ids"]
        if input_ids.shape[1] != self.seq_len:
            raise CacheMismatchError("seq_len", f"batch seq_len {input_ids.shape[1]} != cache "
                                     f"seq_len {self.seq_len}")
        topk = self.get(seq_indices)
        if topk.ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{topk.ids.shape[0]} sequence indices for a batch of {input_ids.shape[0]}")
        if check_inputs:
            cached, actual = self.hashes(seq_indices), sequence_hash(input_ids)
            bad = (cached != actual).nonzero().reshape(-1).tolist()
            if bad:
                raise CacheMismatchError("input_ids", f"{self.root}: batch rows {bad[:8]} do not hold "
                                         f"the tokens cached for their sequence index (loader and "
                                         f"cache out of step?)")
        out = dict(batch)
        out[TEACHER_TOPK_IDS] = topk.ids.to(input_ids.device)
        out[TEACHER_TOPK_LOGPROBS] = topk.logprobs.to(input_ids.device)
        return out


def _compare_teacher(want: Mapping[str, Any], have: Mapping[str, Any], path: Path) -> None:
    """Compare the keys the caller gave, except "source" (where the weights were loaded from is
    informational: the same teacher may be loaded from another path)."""
    for key in sorted(want):
        if key != "source" and want.get(key) != have.get(key):
            detail = ""
            if isinstance(want.get(key), dict) and isinstance(have.get(key), dict):
                diff = sorted(k for k in set(want[key]) | set(have[key])
                              if want[key].get(k) != have[key].get(k))
                detail = f" (differs in {', '.join(diff[:5])})"
            raise CacheMismatchError(f"teacher.{key}", f"{path}: teacher {key} in the cache differs "
                                     f"from the expected teacher{detail}")

"""Where each cached sequence lives: row blocks, part directories, shard headers, errors.

The loader yields, at step s, rows j in [0, B) of the global batch; row j of step s is global
sequence ``s * B + j`` (``ct_model.batch.SEQUENCE_INDEX``). A process of a W-way run owns the rows
[r * B / W, (r + 1) * B / W) of every step: a ``RowBlock``. It writes them, in step-major order,
into its own part directory ``rows-<start>-<stop>/``; position p of a part is its p-th row. So a
part needs no list of sequence numbers, and the mapping global sequence <-> (part, position) is
arithmetic: a cache written by W processes is read by any number.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from ct_model.errors import UserError

FORMAT = "ct-distill/teacher-topk-cache"
VERSION = 2
INDEX = "index.json"
PART = "part.json"
# Must agree between every shard, part and the index (the teacher is compared separately).
LAYOUT_FIELDS = ("seq_len", "k", "vocab_size", "entry", "logprobs_dtype", "batch_size")


class CacheError(UserError, RuntimeError):
    """A teacher cache is unusable."""


class IncompleteCacheError(CacheError):
    """The directory has no index.json, or a file it lists is missing: the writer never finished."""


class CacheMismatchError(CacheError):
    """The cache does not match what the reader expects; ``field`` names what differs."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ----------------------------------------------------------------------------- row blocks


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop) of every global batch of ``batch_size`` sequences."""

    batch_size: int
    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop <= self.batch_size:
            raise ValueError(f"rows [{self.start}, {self.stop}) are not a block of a batch of {self.batch_size}")

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.batch_size

    @property
    def dirname(self) -> str:
        return f"rows-{self.start:06d}-{self.stop:06d}"

    def global_index(self, position: int) -> int:
        step, offset = divmod(position, self.width)
        return step * self.batch_size + self.start + offset

    def position(self, seq: int) -> int:
        step, row = divmod(seq, self.batch_size)
        return step * self.width + row - self.start

    def positions_below(self, num_seqs: int) -> int:
        """How many of this block's positions hold a global sequence < ``num_seqs``."""
        steps, rest = divmod(num_seqs, self.batch_size)
        return steps * self.width + min(max(rest - self.start, 0), self.width)


def split_rows(batch_size: int, parts: int) -> list[RowBlock]:
    """The row blocks of a ``parts``-way run (the loader's: rank r owns [r B/W, (r+1) B/W))."""
    if parts < 1 or batch_size % parts:
        raise ValueError(f"a batch of {batch_size} sequences does not split into {parts} equal row blocks")
    width = batch_size // parts
    return [RowBlock(batch_size, r * width, (r + 1) * width) for r in range(parts)]


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


# ----------------------------------------------------------------------------- files


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write to ``*.tmp``, fsync, rename, fsync the directory: readers see all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=1).encode())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def read_shard_header(path: Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensors) of a safetensors file, without mapping it; CacheError naming the file
    when the header is unreadable or the file is shorter than its header says (truncated)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("no header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        raise CacheError(f"{path}: not a readable cache shard ({err})") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if size != 8 + n + end:
        raise CacheError(f"{path}: {size} bytes but its header describes {8 + n + end} (truncated or "
                         f"appended to); rewrite the cache")
    return meta, header


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


def same_teacher(want: Mapping[str, Any], have: Mapping[str, Any]) -> str | None:
    """The first teacher key (of those in ``want``, except "source": where the weights were loaded
    from is informational) whose value differs, with the differing sub-keys; None if equal."""
    for key in sorted(want):
        if key != "source" and want.get(key) != have.get(key):
            detail = ""
            if isinstance(want.get(key), dict) and isinstance(have.get(key), dict):
                diff = sorted(k for k in set(want[key]) | set(have[key]) if want[key].get(k) != have[key].get(k))
                detail = f" (differs in {', '.join(diff[:5])})"
            return f"{key}{detail}"
    return None

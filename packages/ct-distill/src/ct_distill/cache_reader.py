"""Reading a teacher cache by global sequence index, whoever (how many processes) wrote it.

Everything the index promises is checked when the reader is built, before any training step:
every listed shard exists, has the size the index records, a readable header whose fields,
teacher, rows and positions are the index's, and tensors of the expected shape. A cache that
fails is refused with an error naming the file.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open

from ct_model.batch import SEQUENCE_INDEX

from .cache_entries import PACKED_DTYPES, unpack_entries
from .cache_layout import (FORMAT, INDEX, LAYOUT_FIELDS, VERSION, CacheError, CacheMismatchError,
                           IncompleteCacheError, RowBlock, read_json, read_shard_header, same_teacher,
                           sequence_hash)
from .losses import TopK
from .teacher import TEACHER_TOPK_IDS, TEACHER_TOPK_LOGPROBS

_SAFETENSORS_DTYPES = {"int32": "I32", "int64": "I64", "float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class TeacherCacheReader:
    """Serves cached top-k targets by global sequence index.

    Expected values (``seq_len``, ``k``, ``vocab_size``, ``teacher``) are checked against the
    index when given; a mismatch raises ``CacheMismatchError`` naming the field. For ``teacher``
    (e.g. ``OnlineTeacher.identity()``) the keys given are compared, except "source".
    ``verify=False`` skips opening every shard's header at construction (sizes are still checked).
    """

    def __init__(self, root: str | os.PathLike, *, seq_len: int | None = None, k: int | None = None,
                 vocab_size: int | None = None, teacher: Mapping[str, Any] | None = None,
                 verify: bool = True):
        self.root = Path(root)
        path = self.root / INDEX
        if not path.is_file():
            partial = len(list(self.root.glob("rows-*/shard-*.safetensors"))) if self.root.is_dir() else 0
            raise IncompleteCacheError(
                f"{self.root}: no {INDEX} (incomplete cache: the writers did not finish; "
                f"{partial} shard file(s) present)"
            )
        self.index = read_json(path)
        self._check_index(path, {"seq_len": seq_len, "k": k, "vocab_size": vocab_size}, teacher)
        self.seq_len, self.k, self.vocab_size = (self.index[f] for f in ("seq_len", "k", "vocab_size"))
        self.batch_size = self.index["batch_size"]
        self.num_seqs = self.index["num_seqs"]
        self.packed = self.index["entry"] == "packed32"
        self._dtype = PACKED_DTYPES.get(self.index["logprobs_dtype"])
        self.parts = self.index["parts"]
        self.blocks = self._tile(path)
        self._part_starts = [b.start for b in self.blocks]
        self._shard_firsts = [[s["first"] for s in p["shards"]] for p in self.parts]
        for part, block in zip(self.parts, self.blocks):
            self._check_part(part, block, verify)
        held = min(block.global_index(part["num_seqs"]) for part, block in zip(self.parts, self.blocks))
        if not 0 <= self.num_seqs <= held:
            raise CacheMismatchError("num_seqs", f"{path}: num_seqs={self.num_seqs} but its parts hold {held} "
                                     f"leading sequences (an index pointing past the end of its shards)")
        self._open: dict[str, Any] = {}

    # ------------------------------------------------------------------------- checks

    def _check_index(self, path: Path, expected: Mapping[str, int | None], teacher) -> None:
        index = self.index
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            hint = " (written by an older ct-distill: delete it, it is rewritten)" if index.get("format") == FORMAT else ""
            raise CacheMismatchError("format", f"{path}: format {index.get('format')!r} v{index.get('version')} "
                                     f"is not {FORMAT!r} v{VERSION}{hint}")
        for field, want in expected.items():
            if want is not None and index[field] != want:
                raise CacheMismatchError(field, f"{path}: {field} is {index[field]} in the cache "
                                         f"but {want} was expected")
        if teacher is not None:
            differs = same_teacher(json.loads(json.dumps(dict(teacher))), index["teacher"])
            if differs:
                key = differs.split(" ")[0]
                raise CacheMismatchError(f"teacher.{key}", f"{path}: teacher {differs} in the cache differs "
                                         f"from the expected teacher (written by another teacher?)")

    def _tile(self, path: Path) -> list[RowBlock]:
        """The parts' row blocks, which must tile [0, batch_size) exactly."""
        try:
            blocks = [RowBlock(self.batch_size, *p["rows"]) for p in self.parts]
        except (KeyError, TypeError, ValueError) as err:
            raise CacheMismatchError("parts", f"{path}: malformed parts ({err})") from None
        order = sorted(range(len(blocks)), key=lambda i: blocks[i].start)
        self.parts = [self.parts[i] for i in order]
        blocks = [blocks[i] for i in order]
        edges = [0] + [b.stop for b in blocks]
        if not blocks or [b.start for b in blocks] != edges[:-1] or edges[-1] != self.batch_size:
            raise CacheMismatchError("parts", f"{path}: the parts' rows {[list(p['rows']) for p in self.parts]} "
                                     f"do not tile a batch of {self.batch_size}")
        return blocks

    def _check_part(self, part: Mapping[str, Any], block: RowBlock, verify: bool) -> None:
        position = 0
        for shard in part["shards"]:
            file = self.root / shard["file"]
            if shard["first"] != position:
                raise CacheMismatchError("first", f"{file}: listed at position {shard['first']} but the part's "
                                         f"previous shards end at {position} ({self.root / INDEX})")
            if not file.is_file():
                raise IncompleteCacheError(f"{file}: listed in {self.root / INDEX} but missing")
            size = file.stat().st_size
            if size != shard["bytes"]:
                raise CacheError(f"{file}: {size} bytes but {self.root / INDEX} records {shard['bytes']} "
                                 f"(truncated or replaced); rewrite the cache")
            if verify:
                self._check_shard(file, shard, block)
            position += shard["num_seqs"]
        if position != part["num_seqs"]:
            raise CacheMismatchError("num_seqs", f"{self.root / INDEX}: part {part['dir']} says {part['num_seqs']} "
                                     f"sequences but its shards hold {position}")

    def _check_shard(self, file: Path, shard: Mapping[str, Any], block: RowBlock) -> None:
        meta, tensors = read_shard_header(file)
        want = {**{key: str(self.index[key]) for key in LAYOUT_FIELDS}, "rows": f"{block.start}:{block.stop}",
                "first": str(shard["first"]), "num_seqs": str(shard["num_seqs"])}
        for field, value in want.items():
            if meta.get(field) != value:
                raise CacheMismatchError(field, f"{file}: {field}={meta.get(field)} but the index says {value} "
                                         f"(a shard of another cache or layout)")
        if meta.get("teacher") != json.dumps(self.index["teacher"], sort_keys=True):
            raise CacheMismatchError("teacher.fingerprint", f"{file}: written by another teacher than "
                                     f"{self.root / INDEX} records")
        n, shape = shard["num_seqs"], [shard["num_seqs"], self.seq_len, self.k]
        expected = ({"entries": ("I32", shape)} if self.packed else
                    {"topk_ids": ("I32", shape),
                     "topk_logprobs": (_SAFETENSORS_DTYPES[self.index["logprobs_dtype"]], shape)})
        expected["input_hash"] = ("I64", [n])
        for name, (dtype, dims) in expected.items():
            got = tensors.get(name, {})
            if got.get("dtype") != dtype or got.get("shape") != dims:
                raise CacheMismatchError("entries", f"{file}: tensor {name} is {got.get('dtype')} "
                                         f"{got.get('shape')}, expected {dtype} {dims}")

    # ------------------------------------------------------------------------- lookup

    def __len__(self) -> int:
        return self.num_seqs

    def _handle(self, file: str):
        if file not in self._open:
            if len(self._open) >= 8:
                self._open.pop(next(iter(self._open)))
            self._open[file] = safe_open(str(self.root / file), framework="pt")
        return self._open[file]

    def _locate(self, seq: int) -> tuple[int, int, int]:
        """(part, shard, row within the shard) of global sequence ``seq``."""
        if not 0 <= seq < self.num_seqs:
            raise IndexError(f"sequence index {seq} outside the cache's [0, {self.num_seqs})")
        part = bisect.bisect_right(self._part_starts, seq % self.batch_size) - 1
        position = self.blocks[part].position(seq)
        shard = bisect.bisect_right(self._shard_firsts[part], position) - 1
        return part, shard, position - self._shard_firsts[part][shard]

    def _runs(self, seq: list[int]):
        """Group requested sequences into (shard file, local start, local stop) runs, in order."""
        runs: list[list] = []
        for s in seq:
            part, shard, row = self._locate(s)
            last = runs[-1] if runs else None
            if last and last[0] == (part, shard) and last[2] == row:
                last[2] += 1
            else:
                runs.append([(part, shard), row, row + 1])
        for (part, shard), a, b in runs:
            yield self.parts[part]["shards"][shard]["file"], a, b

    def _read(self, seq_indices, names: Sequence[str]) -> list[torch.Tensor]:
        if isinstance(seq_indices, torch.Tensor):
            seq_indices = seq_indices.reshape(-1).tolist()
        seq = [int(s) for s in seq_indices]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        for file, a, b in self._runs(seq):
            handle = self._handle(file)
            for name in names:
                parts[name].append(handle.get_slice(name)[a:b])
        return [torch.cat(parts[name]) if parts[name] else torch.empty(0) for name in names]

    def get(self, seq_indices: Sequence[int] | torch.Tensor) -> TopK:
        """TopK(ids int64 [n, seq_len, k], logprobs float32 [n, seq_len, k]) for the sequences."""
        if self.packed:
            (words,) = self._read(seq_indices, ("entries",))
            ids, logprobs = unpack_entries(words, vocab_size=self.vocab_size, dtype=self._dtype)
        else:
            ids, logprobs = self._read(seq_indices, ("topk_ids", "topk_logprobs"))
            ids, logprobs = ids.long(), logprobs.float()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise CacheMismatchError("vocab_size", f"{self.root}: cached token ids outside "
                                     f"[0, {self.vocab_size}) (corrupt shard?)")
        return TopK(ids, logprobs)

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

"""A pre-tokenized source: shards of megatron's .bin/.idx layout, read as one document sequence.

A prepared source is one of:
- a directory written by ``ct-data tokenize``: ``manifest.json`` + ``00000.bin/.idx``, ... The
  manifest names the tokenizer (its SHA-256) and every file's size and hash; the loader refuses a
  manifest whose tokenizer is not the run's, an unfinished one, or files whose sizes differ.
- megatron data brought as is: a prefix (``PREFIX.idx`` exists) or a directory of ``*.idx`` pairs
  (read in sorted order). Without a manifest nothing names the tokenizer, so every document read
  is checked against the run's vocabulary.

Document ``i`` of the source is document ``i - offset[k]`` of shard ``k`` (shards concatenated in
order), found by binary search: O(log shards), no scan. At most ``max_open`` shards are memory
mapped at a time (each map holds a file descriptor; a source can have thousands of shards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ct_data.indexed import (
    IndexedDataError,
    IndexedShard,
    bin_path,
    file_sha256,
    idx_path,
)

logger = logging.getLogger("ct_data")

MANIFEST = "manifest.json"
FORMAT = "ct-data indexed v1"


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What a manifest records of the tokenizer (and the loader compares)."""
    sha = hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()
    return {"name": str(tokenizer.name), "sha256": sha, "vocab_size": int(tokenizer.vocab_size),
            "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id)}


def is_prepared(src) -> bool:
    """Whether a source is read from prepared shards: ``file_format: indexed``, or a path that is a
    directory holding a ct-data manifest, or a prefix whose ``.idx`` exists."""
    if src.file_format is not None:
        return src.file_format == "indexed"
    p = Path(os.path.expanduser(src.path))
    if idx_path(p).is_file():
        return True
    m = p / MANIFEST
    if m.is_file():
        try:
            return json.loads(m.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    return False


def read_manifest(directory: str | os.PathLike) -> dict:
    f = Path(directory) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise IndexedDataError(f"{f}: cannot read the manifest ({type(e).__name__}: {e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexedDataError(f"{f}: not a ct-data manifest (format {m.get('format') if isinstance(m, dict) else None!r}, "
                               f"expected {FORMAT!r})")
    return m


class PreparedSource:
    """The documents of a prepared source, in order; ``len()`` and ``doc(i)`` in O(log shards)."""

    def __init__(self, path: str, *, name: str = "", tokenizer=None, max_open: int = 64):
        self.path = os.path.expanduser(path)
        self.name = name or self.path
        self.max_open = max_open
        self.manifest: dict | None = None
        root = Path(self.path)
        if (root / MANIFEST).is_file():
            self.manifest = read_manifest(root)
            self.prefixes = self._from_manifest(root, self.manifest, tokenizer)
        elif idx_path(root).is_file():
            self.prefixes = [root]
        elif root.is_dir():
            self.prefixes = sorted(f.with_suffix("") for f in root.iterdir() if f.suffix == ".idx")
            if not self.prefixes:
                raise IndexedDataError(f"source {self.name!r}: {root} holds neither {MANIFEST} nor .idx files")
        else:
            raise IndexedDataError(f"source {self.name!r}: {self.path!r} is neither a prepared directory nor "
                                   f"a .bin/.idx prefix")
        counts = [self._check_shard(p) for p in self.prefixes]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_docs = int(self.offsets[-1])
        if self.num_docs == 0:
            raise IndexedDataError(f"source {self.name!r}: {self.path!r} holds no documents")
        self.vocab_size = tokenizer.vocab_size if tokenizer is not None else None
        # Data without a manifest names no tokenizer: check every document against the vocabulary.
        self.check_ids = self.manifest is None
        self.dtype = None
        self._open: OrderedDict[int, IndexedShard] = OrderedDict()
        self._checked: set[int] = set()
        self.bytes_read = 0  # token bytes handed out (what a rank reads), for the benchmarks

    # ---------------------------------------------------------------- validation
    def _from_manifest(self, root: Path, m: dict, tokenizer) -> list[Path]:
        where = root / MANIFEST
        if not m.get("complete"):
            raise IndexedDataError(f"{where}: tokenization did not finish ({m.get('done_shards', '?')} of "
                                   f"{len(m.get('shards', []))} shards); run `ct-data tokenize` again to complete it")
        if tokenizer is not None:
            want, have = m.get("tokenizer", {}), tokenizer_fingerprint(tokenizer)
            if want.get("sha256") != have["sha256"]:
                raise IndexedDataError(
                    f"{where}: prepared with tokenizer {want.get('name')!r} (sha256 {str(want.get('sha256'))[:12]}..., "
                    f"vocab {want.get('vocab_size')}), but this run's tokenizer is {have['name']!r} (sha256 "
                    f"{have['sha256'][:12]}..., vocab {have['vocab_size']}); tokenize again with this tokenizer")
        prefixes = []
        for s in m["shards"]:
            p = root / s["name"]
            for f, key in ((bin_path(p), "bin_bytes"), (idx_path(p), "idx_bytes")):
                if not f.is_file():
                    raise IndexedDataError(f"{f}: listed in {where} but missing")
                size = f.stat().st_size
                if size != s[key]:
                    raise IndexedDataError(f"{f}: {size:,} bytes, but {where} records {s[key]:,} "
                                           f"(truncated or replaced; `ct-data verify {root}` checks the hashes)")
            prefixes.append(p)
        return prefixes

    def _check_shard(self, prefix: Path) -> int:
        """Open and check one shard (O(1): header, sizes, last pointer); its document count."""
        shard = IndexedShard(prefix)
        if self.manifest is not None:
            want = np.dtype(self.manifest["dtype"])
            if shard.dtype != want:
                raise IndexedDataError(f"{shard.idx_file}: dtype {shard.dtype}, manifest says {want}")
        return len(shard)

    # ---------------------------------------------------------------- reading
    def shard(self, k: int) -> IndexedShard:
        s = self._open.get(k)
        if s is None:
            s = IndexedShard(self.prefixes[k])
            if k not in self._checked:  # once per shard and process: O(its sequences), vectorised
                s.check_all()
                self._checked.add(k)
            self._open[k] = s
            if len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(k)
        return s

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (0 <= i < num_docs)."""
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.doc_in(k, i - int(self.offsets[k]))

    def doc_in(self, k: int, i: int) -> np.ndarray:
        """Token ids of document i of shard k."""
        shard = self.shard(k)
        ids = shard.doc(i)
        self.bytes_read += ids.nbytes
        if self.check_ids and self.vocab_size is not None and ids.size and int(ids.max()) >= self.vocab_size:
            raise IndexedDataError(f"{shard.bin_file}: document {i} holds token id {int(ids.max())}, beyond the "
                                   f"tokenizer's vocabulary of {self.vocab_size}")
        return ids

    def group(self, g: int, groups: int) -> "PreparedSource | ShardGroup":
        """Shards g, g + groups, g + 2*groups ... as one document sequence (see ct_data.reader)."""
        return self if groups == 1 else ShardGroup(self, list(range(g, len(self.prefixes), groups)))


class ShardGroup:
    """Some shards of a prepared source, concatenated in order: ``num_docs`` and ``doc(i)``."""

    def __init__(self, source: PreparedSource, shards: list[int]):
        self.source, self.shards = source, shards
        counts = np.diff(source.offsets)[shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.num_docs = int(self.offsets[-1])
        if self.num_docs == 0:
            raise IndexedDataError(f"source {source.name!r}: shards {shards[:4]}{'...' if len(shards) > 4 else ''} "
                                   f"of {source.path} (one group of the source's shards) hold no documents")

    def doc(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.source.doc_in(self.shards[k], i - int(self.offsets[k]))


def verify(directory: str | os.PathLike) -> list[str]:
    """Recompute every file's SHA-256 against the manifest; the list of problems (empty: all good)."""
    root = Path(directory)
    m = read_manifest(root)
    problems = []
    for s in m["shards"]:
        for f, key in ((bin_path(root / s["name"]), "bin_sha256"), (idx_path(root / s["name"]), "idx_sha256")):
            if not f.is_file():
                problems.append(f"{f}: missing")
            elif file_sha256(f) != s[key]:
                problems.append(f"{f}: SHA-256 differs from the manifest")
    if not m.get("complete"):
        problems.append(f"{root / MANIFEST}: incomplete ({len(m['shards'])} shard(s) listed)")
    return problems


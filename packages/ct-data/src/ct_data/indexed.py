"""Megatron-core's indexed dataset layout (``PREFIX.bin`` + ``PREFIX.idx``), read and written
without megatron.

Why this layout: data prepared with megatron's ``tools/preprocess_data.py`` loads here unchanged,
and what ``ct-data tokenize`` writes loads in ``megatron.core.datasets.indexed_dataset.IndexedDataset``
(tested). ``.bin`` is the token ids of every sequence back to back; ``.idx`` is, little-endian::

    b"MMIDIDX\\x00\\x00"   9 bytes, magic
    u64  version = 1
    u8   dtype code        (megatron's DType: 8 = uint16, 4 = int32, ...)
    u64  S                 sequences
    u64  D                 entries of the document index (documents + 1)
    i32  lengths[S]        tokens per sequence
    i64  pointers[S]       byte offset of each sequence in .bin
    i64  doc_index[D]      sequence index where each document starts; the last entry is S
   (i8   modes[S]          only in megatron's multimodal files; ignored here)

A document is the sequences ``doc_index[i] .. doc_index[i+1]`` (one sequence per document in what
we write; megatron's sentence-split data has several), read as one run of ``.bin``.

megatron's format has no uint32 code, so a vocabulary above 65,536 ids is stored as int32 (as
megatron's own preprocessing does); below that, uint16 halves the bytes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path

import numpy as np

from ct_data.sources import DataSourceError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
TOKEN_DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.int16), np.dtype(np.int32), np.dtype(np.int64)}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDataError(DataSourceError):
    """A .bin/.idx pair that cannot be read as it claims (truncated, corrupt, out of range)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (megatron has no uint32 code)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


# ----------------------------------------------------------------------------- writing
class IndexedWriter:
    """Writes one shard: documents appended one at a time, then ``finish()``.

    Both files are written under temporary names and renamed into place by ``finish()`` (.bin
    first), so a killed writer never leaves a pair that looks complete. The SHA-256 of each file
    is computed while writing (no second read).
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"indexed writer: dtype {self.dtype} has no megatron code")
        self._tmp_bin = bin_path(self.prefix).with_suffix(".bin.tmp")
        self._bin = open(self._tmp_bin, "wb")
        self._hash = hashlib.sha256()
        self._lengths = array("i")  # int32, as the .idx stores them
        self._limit = np.iinfo(self.dtype).max
        self.tokens = 0

    def add(self, ids) -> None:
        a = np.asarray(ids)
        if a.size and (int(a.max()) > self._limit or int(a.min()) < 0):
            raise ValueError(f"{self.prefix}: token id out of range for {self.dtype}")
        data = a.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._lengths.append(a.size)
        self.tokens += a.size

    def add_many(self, flat: np.ndarray, lengths) -> None:
        """Append several documents at once: ``flat`` holds them back to back."""
        flat = np.asarray(flat)
        if flat.size and (int(flat.max()) > self._limit or int(flat.min()) < 0):
            raise ValueError(f"{self.prefix}: token id out of range for {self.dtype}")
        data = flat.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._hash.update(data)
        self._lengths.extend(lengths)
        self.tokens += flat.size

    @property
    def docs(self) -> int:
        return len(self._lengths)

    def finish(self) -> dict:
        """Close, write the index, rename both into place; returns sizes and hashes."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(len(lengths) + 1, dtype=np.int64)
        head = MAGIC + struct.pack("<Q", VERSION) + struct.pack("<B", CODE_OF[self.dtype])
        head += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
        idx_bytes = head + lengths.tobytes() + pointers.tobytes() + doc_index.tobytes()
        tmp_idx = idx_path(self.prefix).with_suffix(".idx.tmp")
        tmp_idx.write_bytes(idx_bytes)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(tmp_idx, idx_path(self.prefix))
        return {"docs": len(lengths), "tokens": self.tokens,
                "bin_bytes": self.tokens * self.dtype.itemsize, "idx_bytes": len(idx_bytes),
                "bin_sha256": self._hash.hexdigest(), "idx_sha256": hashlib.sha256(idx_bytes).hexdigest()}

    def abort(self) -> None:
        self._bin.close()
        self._tmp_bin.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading
class IndexedShard:
    """One .bin/.idx pair, memory-mapped: ``len()`` documents, ``doc(i)`` in O(1).

    Opening checks, in O(1), what can be checked without reading the whole index: the header, the
    index file's size against its counts, the document index's last entry, and that the last
    sequence ends exactly at the end of .bin (a truncated .bin or an index pointing past it is
    an error naming the file). Each read checks its own range again.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.idx_file, self.bin_file = idx_path(prefix), bin_path(prefix)
        for f in (self.idx_file, self.bin_file):
            if not f.is_file():
                raise IndexedDataError(f"{f}: file not found (an indexed dataset is PREFIX.bin + PREFIX.idx)")
        self._read_index()
        self.bin_bytes = self.bin_file.stat().st_size
        end = 0
        if self.num_sequences:
            end = int(self.pointers[-1]) + int(self.lengths[-1]) * self.itemsize
        if end > self.bin_bytes:
            raise IndexedDataError(f"{self.bin_file}: truncated: the index {self.idx_file.name} points to byte "
                                   f"{end:,} but the file has {self.bin_bytes:,} bytes")
        if end < self.bin_bytes:
            raise IndexedDataError(f"{self.bin_file}: {self.bin_bytes - end:,} bytes beyond the last sequence "
                                   f"of {self.idx_file.name} (wrong index for this file?)")
        # An empty .bin cannot be memory-mapped; a shard of empty documents needs no data.
        self._data = np.memmap(self.bin_file, dtype=self.dtype, mode="r") if self.bin_bytes else np.zeros(0, self.dtype)

    def _read_index(self) -> None:
        f = self.idx_file
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:9] != MAGIC:
            raise IndexedDataError(f"{f}: not a megatron indexed-dataset index (bad header)")
        version, code, S, D = struct.unpack("<QBQQ", head[9:])
        if version != VERSION:
            raise IndexedDataError(f"{f}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES or np.dtype(DTYPE_CODES[code]) not in TOKEN_DTYPES:
            raise IndexedDataError(f"{f}: dtype code {code} is not an integer token type")
        need = HEADER_BYTES + 4 * S + 8 * S + 8 * D
        if size not in (need, need + S):  # + S: megatron's multimodal files carry an int8 mode per sequence
            raise IndexedDataError(f"{f}: {size:,} bytes, but its header promises {S:,} sequences and {D:,} "
                                   f"document entries ({need:,} bytes): truncated or corrupt")
        if D < 1:
            raise IndexedDataError(f"{f}: empty document index")
        self.dtype = np.dtype(DTYPE_CODES[code])
        self.itemsize = self.dtype.itemsize
        self.num_sequences = S
        mm = np.memmap(f, dtype=np.uint8, mode="r")
        self.lengths = np.frombuffer(mm, dtype=np.int32, count=S, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(mm, dtype=np.int64, count=S, offset=HEADER_BYTES + 4 * S)
        self.doc_index = np.frombuffer(mm, dtype=np.int64, count=D, offset=HEADER_BYTES + 12 * S)
        if int(self.doc_index[0]) != 0 or int(self.doc_index[-1]) != S:
            raise IndexedDataError(f"{f}: the document index runs {int(self.doc_index[0])}..{int(self.doc_index[-1])}, "
                                   f"expected 0..{S} (the sequence count)")
        self._mm = mm

    def __len__(self) -> int:
        return len(self.doc_index) - 1

    def check_all(self) -> None:
        """Every entry of the index in range (O(sequences), vectorised): run once per shard, when the
        loader first reads from it, and by ``ct-data verify``."""
        f, S = self.idx_file, self.num_sequences
        lengths, pointers = self.lengths.astype(np.int64), self.pointers
        if S and (lengths.min() < 0 or pointers.min() < 0 or (pointers % self.itemsize).any()):
            raise IndexedDataError(f"{f}: negative or misaligned sequence lengths/pointers")
        ends = pointers + lengths * self.itemsize
        if S and ends.max() > self.bin_bytes:
            bad = int(np.argmax(ends > self.bin_bytes))
            raise IndexedDataError(f"{f}: sequence {bad} ends at byte {int(ends[bad]):,}, past the end of "
                                   f"{self.bin_file.name} ({self.bin_bytes:,} bytes)")
        if (np.diff(self.doc_index) < 0).any():
            raise IndexedDataError(f"{f}: the document index is not in increasing order")

    def span(self, i: int) -> tuple[int, int]:
        """(first token, number of tokens) of document i in .bin."""
        s0, s1 = int(self.doc_index[i]), int(self.doc_index[i + 1])
        if not 0 <= s0 <= s1 <= self.num_sequences:
            raise IndexedDataError(f"{self.idx_file}: document {i} refers to sequences {s0}..{s1} of "
                                   f"{self.num_sequences}")
        if s0 == s1:
            return 0, 0
        start = int(self.pointers[s0])
        end = int(self.pointers[s1 - 1]) + int(self.lengths[s1 - 1]) * self.itemsize
        if start < 0 or end > self.bin_bytes or end < start or start % self.itemsize:
            raise IndexedDataError(f"{self.idx_file}: document {i} spans bytes {start:,}..{end:,}, outside "
                                   f"{self.bin_file.name} ({self.bin_bytes:,} bytes)")
        return start // self.itemsize, (end - start) // self.itemsize

    def doc(self, i: int) -> np.ndarray:
        """The token ids of document i (a read-only view into the memory map)."""
        start, n = self.span(i)
        return self._data[start:start + n]

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document (reads the whole index: for tools, not for the loader)."""
        per_seq = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)])
        return per_seq[self.doc_index[1:]] - per_seq[self.doc_index[:-1]]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

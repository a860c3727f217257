"""Packing documents into fixed-length rows, one independent stream per global batch row.

A row's stream picks a source (``Mixer``), takes that source's next item for the row
(``SourceReader`` or ``IndexedReader``) and lays its pieces out back to back. Every piece gets its own document id and
position ids counting from 0 at its first token; a piece cut by the end of a row continues at the
start of the row's next sequence with its positions continuing, so no token is lost and the
concatenation of a row's sequences is exactly the concatenation of its documents.

Modes:
- ``mixed``      (pretraining) documents of all sources share sequences; long ones cross rows.
- ``per_source`` (pretraining; the public MobileLLM-R1 recipe) each sequence is drawn from one
  source, and every source keeps its own carry-over.
- ``packed``     (SFT) examples are never split: each row starts with the oldest example of a small
  look-ahead buffer and is topped up best-fit from it; the rest of the row is padded.
  ``sft_lookahead=1`` packs in order; ``packing="none"`` puts one example per row.

Padding tokens: ``pad_id``, label -100, document id -1, position ids 0, 1, 2 ...
"""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from ct_data.mixing import Mixer
from ct_data.processing import IGNORE, Doc, Piece, Skip
from ct_data.reader import EXHAUSTED

logger = logging.getLogger("ct_data")

PAD_DOC_ID = -1
PRETRAIN_PACKING = ("mixed", "per_source")
SFT_PACKING = ("packed", "none")

STAT_KEYS = ("docs", "tokens", "lost_tokens", "truncated", "split")
_ARANGE = np.arange(1 << 16, dtype=np.int64)  # position ids are slices of this (no allocation)


def _positions(start: int, n: int) -> np.ndarray:
    return _ARANGE[start:start + n] if start + n <= len(_ARANGE) else np.arange(start, start + n, dtype=np.int64)


class Columns:
    """The four int64 columns of a batch, ``[rows, seq_len]``, filled row by row in place."""

    def __init__(self, rows: int, seq_len: int):
        self.ids = np.empty((rows, seq_len), dtype=np.int64)
        self.labels = np.empty((rows, seq_len), dtype=np.int64)
        self.pos = np.empty((rows, seq_len), dtype=np.int64)
        self.doc = np.empty((rows, seq_len), dtype=np.int64)

    def row(self, i: int) -> "_Row":
        return _Row(self.ids[i], self.labels[i], self.pos[i], self.doc[i])


class _Row:
    """One row under construction: views into the batch columns and a fill level ``n``."""

    __slots__ = ("ids", "labels", "pos", "doc", "n", "ndocs")

    def __init__(self, ids: np.ndarray, labels: np.ndarray, pos: np.ndarray, doc: np.ndarray):
        self.ids, self.labels, self.pos, self.doc = ids, labels, pos, doc
        self.n = 0
        self.ndocs = 0

    def add(self, piece: Piece, start: int, n: int) -> None:
        a, b = self.n, self.n + n
        self.ids[a:b] = piece.ids[start:start + n]
        self.labels[a:b] = piece.labels[start:start + n]
        self.pos[a:b] = _positions(start, n)
        self.doc[a:b] = self.ndocs
        self.ndocs += 1
        self.n = b

    def pad(self, seq_len: int, pad_id: int) -> int:
        real = self.n
        if real < seq_len:
            self.ids[real:] = pad_id
            self.labels[real:] = IGNORE
            self.pos[real:] = _ARANGE[:seq_len - real] if seq_len - real <= len(_ARANGE) else np.arange(seq_len - real)
            self.doc[real:] = PAD_DOC_ID
        return real


class RowStream:
    """The endless (or, with the stop policy, finite) sequence stream of one global batch row."""

    def __init__(self, row: int, *, names: list[str], readers: list, mixer: Mixer,
                 seq_len: int, pad_id: int, mode: str, sft_lookahead: int = 16):
        self.row = row
        self.names = names
        self.readers = readers
        self.mixer = mixer
        self.T = seq_len
        self.pad_id = pad_id
        self.mode = mode
        self.lookahead = 1 if mode == "none" else sft_lookahead
        # Carry-over: [source, piece, offset] of pieces started or queued but not yet emitted.
        self.carry: dict[int, deque] = {s: deque() for s in range(len(names))}
        self.buffer: list[tuple[int, Piece]] = []  # SFT look-ahead
        self.stats = {n: dict.fromkeys(STAT_KEYS, 0) for n in names}
        self.skipped = {n: {} for n in names}
        self.seqs = 0
        self.real_tokens = 0
        self.done = False
        self._consecutive_skips = [0] * len(names)

    # ---------------------------------------------------------------- one sequence
    def next_sequence(self, seq: _Row) -> int:
        """Fill ``seq`` with the next row; returns its number of non-padding tokens (0: all padding,
        once the row is done)."""
        if not self.done:
            if self.mode == "mixed":
                self._fill_mixed(seq)
            elif self.mode == "per_source":
                self._fill_per_source(seq)
            else:
                self._fill_sft(seq)
            if not seq.n and self._drained():
                self.done = True
                logger.info("row %d has used up every source", self.row)
        real = seq.pad(self.T, self.pad_id)
        self.seqs += 1
        self.real_tokens += real
        return real

    def _drained(self) -> bool:
        return not self.mixer.any_active() and not self.buffer and not any(self.carry.values())

    def _fill_mixed(self, seq: _Row) -> None:
        queue = self.carry[0]  # mixed mode keeps a single carry queue (source noted per entry)
        while seq.n < self.T:
            if not queue and not self._load(None, queue):
                return
            self._emit_from(queue, seq)

    def _fill_per_source(self, seq: _Row) -> None:
        while True:
            if not self.mixer.any_active() and not any(self.carry.values()):
                return
            # Leftovers of a source that has left the mix still get emitted, in source order.
            leftovers = [s for s in self.carry if self.carry[s] and not self.mixer.active[s]]
            s = leftovers[0] if leftovers else self.mixer.pick()
            queue = self.carry[s]
            if not queue and not self._load(s, queue, count_tokens=False):
                continue  # s just ran out: pick again
            break
        while seq.n < self.T:
            if not queue and not self._load(s, queue, count_tokens=False):
                return  # s ran out mid-sequence: pad the rest
            self._emit_from(queue, seq)
        self.mixer.add(s, seq.n)

    def _emit_from(self, queue: deque, seq: _Row) -> None:
        entry = queue[0]
        _, piece, off = entry
        n = min(self.T - seq.n, len(piece.ids) - off)
        seq.add(piece, off, n)
        if off + n == len(piece.ids):
            queue.popleft()
        else:
            entry[2] = off + n

    def _fill_sft(self, seq: _Row) -> None:
        while True:
            while len(self.buffer) < self.lookahead and self.mixer.any_active():
                self._load_sft()
            if self.mode == "none" and seq.n:
                return
            # A row starts with the oldest buffered example (so none waits more than `lookahead`
            # rows), then takes the longest example that fits the room left (earliest on ties).
            room = self.T - seq.n
            i, best = -1, 0
            for k, (_, p) in enumerate(self.buffer):
                if best < len(p.ids) <= room:
                    i, best = k, len(p.ids)
                if not seq.n and i == 0:
                    break
            if i < 0:
                return
            _, piece = self.buffer.pop(i)
            seq.add(piece, 0, len(piece.ids))

    # ---------------------------------------------------------------- drawing documents
    def _next_doc(self, s: int | None) -> tuple[int, Doc] | None:
        """Draw documents (from source s, or from the mixer's pick) until one is usable."""
        while True:
            if s is None:
                if not self.mixer.any_active():
                    return None
                src = self.mixer.pick()
            elif not self.mixer.active[s]:
                return None
            else:
                src = s
            item = self.readers[src].next_item(self.row)
            if item is EXHAUSTED:
                self.mixer.deactivate(src)
                logger.info("row %d: source %r exhausted", self.row, self.names[src])
                if s is not None or not self.mixer.any_active():
                    return None
                continue
            name = self.names[src]
            if isinstance(item, Skip):
                self._record_skip(src, item.reason)
                continue
            self._consecutive_skips[src] = 0
            st = self.stats[name]
            st["docs"] += 1
            st["tokens"] += item.ntok
            if item.lost:
                st["truncated"] += 1
                st["lost_tokens"] += item.lost
            if item.split:
                st["split"] += 1
            return src, item

    def _record_skip(self, src: int, reason: str) -> None:
        name = self.names[src]
        counts = self.skipped[name]
        if reason not in counts:
            logger.warning("source %r: skipping documents (%s); counts are in the loader's stats()",
                           name, reason)
        counts[reason] = counts.get(reason, 0) + 1
        self._consecutive_skips[src] += 1
        n = self.readers[src].docs_per_epoch(self.row)
        if n is not None and self._consecutive_skips[src] > n:
            raise RuntimeError(f"source {name!r}: every document is being skipped ({counts}); "
                               f"check the field names and the length limits")

    def _load(self, s: int | None, queue: deque, count_tokens: bool = True) -> bool:
        got = self._next_doc(s)
        if got is None:
            return False
        src, doc = got
        for p in doc.pieces:
            queue.append([src, p, 0])
        if count_tokens:
            self.mixer.add(src, doc.ntok)
        return True

    def _load_sft(self) -> None:
        got = self._next_doc(None)
        if got is not None:
            src, doc = got
            self.mixer.add(src, doc.ntok)
            self.buffer.append((src, doc.pieces[0]))

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        def piece(src, p, off):
            if p.ref is not None:  # re-read from the prepared source on resume: O(1), no tokens saved
                return {"source": self.names[src], "ref": list(p.ref), "pos": off}
            # Array views (never modified in place): state_dict() turns them into lists when saved.
            return {"source": self.names[src], "ids": p.ids[off:], "labels": p.labels[off:], "pos": off}

        return {
            "mixer": self.mixer.state(),
            "cursors": {n: r.cursor_of(self.row) for n, r in zip(self.names, self.readers)},
            "carry": [piece(*e) for s in sorted(self.carry) for e in self.carry[s]],
            "buffer": [piece(src, p, 0) for src, p in self.buffer],
            "stats": {n: dict(v) for n, v in self.stats.items()},
            "skipped": {n: dict(v) for n, v in self.skipped.items()},
            "seqs": self.seqs,
            "real_tokens": self.real_tokens,
            "done": self.done,
        }

    def load(self, st: dict) -> None:
        index = {n: i for i, n in enumerate(self.names)}
        self.mixer.load(st["mixer"])
        for e in st["carry"]:
            s = index[e["source"]]
            if "ref" in e:
                p = self.readers[s].piece_at(self.row, *e["ref"])
            else:
                pad = np.zeros(e["pos"], dtype=np.int64)
                p = Piece(np.concatenate([pad, np.asarray(e["ids"], dtype=np.int64)]),
                          np.concatenate([pad + IGNORE, np.asarray(e["labels"], dtype=np.int64)]))
            self.carry[0 if self.mode == "mixed" else s].append([s, p, e["pos"]])
        self.buffer = [(index[e["source"]], Piece(np.asarray(e["ids"], dtype=np.int64),
                                                  np.asarray(e["labels"], dtype=np.int64)))
                       for e in st["buffer"]]
        for n in self.names:
            self.stats[n].update(st["stats"].get(n, {}))
            self.skipped[n].update(st["skipped"].get(n, {}))
        self.seqs = int(st["seqs"])
        self.real_tokens = int(st["real_tokens"])
        self.done = bool(st["done"])

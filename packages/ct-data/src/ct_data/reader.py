"""One source, read for the rows this rank owns.

The source's records, cycled epoch after epoch, form an endless sequence indexed by *position*
(``epoch * num_docs + index``). Position ``p`` belongs to global row ``p % num_rows``: row j draws
positions j, j + B, j + 2B, ... in order, so rows never share a document, none is skipped, and
what a row sees does not depend on how rows are spread over ranks. A rank reads every record of
the source (or of its rows' shard groups, below) but processes and tokenises only its own rows'.

A row's cursor is the number of positions it has drawn; cursors are the reader's whole state. On
resume the reader re-opens the source at the smallest position still needed (``datasets``'
``skip`` re-reads the records before it: cheap for local files, a re-download for hub streams).

Shard groups: a source of S shards (files, or the pieces ``datasets`` streams a hub dataset in)
read with a global batch of B rows is read as G = gcd(S, B) groups (``GroupedReader``): group g
is shards g, g + G, g + 2G ... and feeds rows g*B/G .. (g+1)*B/G - 1 as above, as if it were a
source of its own. G depends on the data and B only, so the global batch sequence still does not
depend on the world size, and a rank reads only its rows' groups: about 1/min(G, W) of the source
instead of all of it. With G = 1 (one file, or S sharing no factor with B) this is the plain
reader above.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Any

from ct_data.config import SourceConfig
from ct_data.processing import Doc, Skip
from ct_data.sources import DataSourceError, iter_record_batches

logger = logging.getLogger("ct_data")

EXHAUSTED = object()  # no more documents for this row (the "stop" policy)


class SourceReader:
    def __init__(
        self,
        src: SourceConfig,
        dataset: Any,
        processor: Callable[[SourceConfig, list[dict]], list[Doc | Skip]],
        *,
        num_rows: int,
        rows: range,
        cursors: dict[int, int],
        num_docs: int | None,
        max_epochs: int | None,
        read_batch: int = 256,
    ):
        self.src, self.ds, self.process = src, dataset, processor
        self.B, self.rows = num_rows, rows
        self.cursor = {j: int(cursors.get(j, 0)) for j in rows}  # positions drawn per row
        self.num_docs = num_docs
        self.max_epochs = max_epochs
        self.read_batch = read_batch
        self.buffers: dict[int, deque] = {j: deque() for j in rows}
        # Next position to buffer per row: starts at its cursor (earlier positions were consumed).
        self._want = {j: j + self.B * self.cursor[j] for j in rows}
        self.pos = min(self._want.values()) if rows else 0  # next position to read
        self._it = None
        self._finished = False  # reached the end of the last allowed epoch

    # ---------------------------------------------------------------- public
    def cursor_of(self, row: int) -> int:
        return self.cursor[row]

    def docs_per_epoch(self, row: int) -> int | None:
        return self.num_docs

    def num_docs_state(self):
        return self.num_docs

    @property
    def epoch(self) -> int:
        """Epochs completed by the reading position (how often the source has wrapped)."""
        return self.pos // self.num_docs if self.num_docs else 0

    def limit(self) -> int | None:
        """First position past the data under the stop policy (None: endless)."""
        if self.max_epochs is None or self.num_docs is None:
            return None
        return self.max_epochs * self.num_docs

    def next_item(self, row: int) -> Doc | Skip | object:
        buf = self.buffers[row]
        while not buf:
            lim = self.limit()
            if lim is not None and row + self.B * self.cursor[row] >= lim:
                return EXHAUSTED
            self._read_more()
        self.cursor[row] += 1
        return buf.popleft()

    # ---------------------------------------------------------------- reading
    def _open(self) -> None:
        start = self.pos % self.num_docs if self.num_docs else self.pos
        self._it = iter(iter_record_batches(self.src, self.ds, start, self.read_batch))

    def _read_more(self) -> None:
        if self._finished:
            raise RuntimeError(f"source {self.src.name!r}: read past the end")  # guarded by limit()
        if self._it is None:
            self._open()
        batch = next(self._it, None)
        if not batch:
            self._end_of_pass()
            return
        wanted: list[tuple[int, dict]] = []
        B, lo, hi = self.B, self.rows.start, self.rows.stop
        for i, rec in enumerate(batch):
            p = self.pos + i
            j = p % B
            if lo <= j < hi and p >= self._want[j]:
                wanted.append((j, rec))
                self._want[j] = p + B
        self.pos += len(batch)
        if wanted:
            items = self.process(self.src, [r for _, r in wanted])
            for (j, _), item in zip(wanted, items):
                self.buffers[j].append(item)

    def _end_of_pass(self) -> None:
        self._it = None
        if self.num_docs is None:
            if self.pos == 0:
                raise DataSourceError(f"source {self.src.name!r}: {self.src.path!r} holds no records")
            self.num_docs = self.pos
        elif self.pos % self.num_docs != 0:
            raise DataSourceError(f"source {self.src.name!r}: the data changed while training "
                                  f"(a pass ended after {self.pos % self.num_docs} records, "
                                  f"expected {self.num_docs})")
        done = self.pos // self.num_docs
        if self.max_epochs is not None and done >= self.max_epochs:
            self._finished = True
            logger.info("source %r exhausted after %d epoch(s) of %d documents; it leaves the mix",
                        self.src.name, done, self.num_docs)
        else:
            logger.info("source %r wrapped around after %d documents; starting epoch %d",
                        self.src.name, self.num_docs, done)


class IndexedReader:
    """One prepared (pre-tokenized) source, read for the rows this rank owns.

    The same positions as ``SourceReader`` (row j draws j, j + B, j + 2B ...; position p is
    document ``p % num_docs`` of epoch ``p // num_docs``), but every document is read directly
    from its shard: a rank touches only its rows' documents, and a cursor is the whole state,
    so resuming at document 10**9 costs what resuming at 10 does.
    """

    def __init__(self, src: SourceConfig, prepared, processor, *, num_rows: int, rows: range,
                 cursors: dict[int, int], max_epochs: int | None):
        self.src, self.data, self.processor = src, prepared, processor
        self.B, self.rows = num_rows, rows
        self.cursor = {j: int(cursors.get(j, 0)) for j in rows}
        self.num_docs = prepared.num_docs
        self.max_epochs = max_epochs
        self._exhausted_logged = False

    def limit(self) -> int | None:
        return None if self.max_epochs is None else self.max_epochs * self.num_docs

    def cursor_of(self, row: int) -> int:
        return self.cursor[row]

    def docs_per_epoch(self, row: int) -> int:
        return self.num_docs

    def num_docs_state(self) -> int:
        return self.num_docs

    def _doc_at(self, position: int) -> Doc:
        doc = self.processor.from_tokens(self.data.doc(position % self.num_docs))
        for k, piece in enumerate(doc.pieces):
            piece.ref = (position, k)
        return doc

    def piece_at(self, row: int, position: int, k: int):
        """Piece k of the document at ``position`` (to restore a carried-over piece)."""
        return self._doc_at(position).pieces[k]

    def next_item(self, row: int) -> Doc | object:
        p = row + self.B * self.cursor[row]
        lim = self.limit()
        if lim is not None and p >= lim:
            if not self._exhausted_logged:
                self._exhausted_logged = True
                logger.info("source %r exhausted after %d epoch(s) of %d documents; it leaves the mix",
                            self.src.name, self.max_epochs, self.num_docs)
            return EXHAUSTED
        self.cursor[row] += 1
        return self._doc_at(p)


def source_groups(num_shards: int, batch_size: int) -> int:
    """How many shard groups a source is read as (see the module docstring)."""
    return math.gcd(max(1, int(num_shards)), batch_size)


class GroupedReader:
    """A source read as G shard groups: one plain reader per group this rank's rows draw from.

    ``make(g, local_rows, local_cursors, num_docs)`` builds the reader of group g over its rows
    numbered from 0 (global row ``g * R + l`` is local row ``l``, R = B / G).
    """

    def __init__(self, make, *, groups: int, num_rows: int, rows: range, cursors: dict[int, int],
                 num_docs: dict | None):
        self.G, self.R = groups, num_rows // groups
        num_docs = num_docs or {}
        self.subs = {}
        for g in sorted({j // self.R for j in rows}):
            base = g * self.R
            local = range(max(rows.start, base) - base, min(rows.stop, base + self.R) - base)
            n = num_docs.get(str(g))
            self.subs[g] = make(g, local, {l: cursors.get(base + l, 0) for l in local}, n)

    def _sub(self, row: int):
        g = row // self.R
        return self.subs[g], row - g * self.R

    def next_item(self, row: int):
        sub, l = self._sub(row)
        return sub.next_item(l)

    def cursor_of(self, row: int) -> int:
        sub, l = self._sub(row)
        return sub.cursor_of(l)

    def docs_per_epoch(self, row: int) -> int | None:
        sub, l = self._sub(row)
        return sub.docs_per_epoch(l)

    def piece_at(self, row: int, position: int, k: int):
        sub, l = self._sub(row)
        return sub.piece_at(l, position, k)

    def num_docs_state(self) -> dict[str, int] | None:
        """Documents per group, for the groups this rank has seen whole (``merge_states`` unites ranks)."""
        known = {str(g): sub.num_docs_state() for g, sub in self.subs.items() if sub.num_docs_state() is not None}
        return known or None


def epoch_of(row: int, cursor: int, batch_size: int, groups: int, num_docs) -> int | None:
    """Epochs a row's source (or its group of shards) has wrapped after ``cursor`` positions."""
    if not cursor or not num_docs:
        return 0
    R = batch_size // groups
    n = num_docs if groups == 1 else (num_docs.get(str(row // R)) if isinstance(num_docs, dict) else None)
    if not n:
        return 0
    return (row % R + R * (cursor - 1)) // n

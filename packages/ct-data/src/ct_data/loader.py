"""The resumable, layout-invariant, prefetching loader of packed batches.

Semantics (see docs/ct-data.md):
- ``batch_size`` is the global batch B (sequences per step over all ranks). Global row j of every
  step comes from its own stream (``RowStream``): the data of row j depends on (seed, B, j, the
  sources and options) and on nothing else, so the global batch is the same for any world size.
  Rank r of W yields rows [r*B/W, (r+1)*B/W) and only tokenises the documents of those rows.
- Each ``next()`` returns int64 tensors ``input_ids``, ``labels``, ``position_ids``,
  ``document_ids``, all ``[B/W, seq_len]``; ``labels`` are already shifted (target of position t);
  and ``sequence_index`` ``[B/W]``, each row's global position ``step * B + j`` in the loader's
  order (what teacher caches are keyed by; the trainer never re-derives it).
- Sources are text (tokenised on the fly) or prepared (pre-tokenized indexed shards, read by
  position: ct_data.prepared). A source of S shards is read as gcd(S, B) shard groups, so a rank
  opens only its rows' files (ct_data.reader).
- Batches are produced ahead by a thread (``prefetch``) or by ``workers`` processes, each making a
  block of this rank's rows (ct_data.workers); neither changes a batch.
- ``state_dict()`` describes the state after the last batch handed out (prefetched batches are
  not counted): per row its source cursors, mixer counters, carried-over tokens and statistics,
  plus each source's size once known. A new loader built with the same arguments and given that
  state yields the same batches as the original would have.
"""

from __future__ import annotations

import atexit
import copy
import logging
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ct_model.batch import SEQUENCE_INDEX

from ct_data.config import DataConfigError, SourceConfig, normalize_sources
from ct_data.mixing import Mixer
from ct_data.packing import PRETRAIN_PACKING, SFT_PACKING, Columns, RowStream
from ct_data.prepared import PreparedSource, is_prepared
from ct_data.processing import LONG_DOC_POLICIES, SFT_LOSS, SFT_TRUNCATION, PretrainProcessor, SFTProcessor
from ct_data.reader import GroupedReader, IndexedReader, SourceReader, epoch_of, source_groups
from ct_data.sources import check_fields, check_local_records, first_record, open_dataset
from ct_data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger("ct_data")

STATE_VERSION = 1
ON_EXHAUSTED = ("cycle", "stop")
BATCH_KEYS = ("input_ids", "labels", "position_ids", "document_ids")

Batch = dict[str, torch.Tensor]

_LIVE: "weakref.WeakSet[PackedLoader]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Join prefetch threads before the interpreter tears down the tokenizer's native threads.
    for loader in list(_LIVE):
        loader.close()


class _End:
    pass


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataConfigError(f"loader: {name} must be an integer >= {minimum}, got {value!r}")
    return value


class PackedLoader:
    """Iterable of packed batches; build it with build_pretrain_loader / build_sft_loader."""

    def __init__(
        self,
        kind: str,
        sources: Sequence[SourceConfig | Mapping[str, Any]] | Mapping[str, Any],
        tokenizer: Tokenizer | str,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        packing: str,
        options: dict[str, Any],
        on_exhausted: str = "cycle",
        max_epochs: int | None = None,
        mix_jitter: float | None = None,
        prefetch: int = 4,
        read_batch: int = 256,
        validate: bool = True,
        workers: int = 0,
        _rows: range | None = None,
    ):
        self.kind = kind
        self.seq_len = _check_int("seq_len", seq_len, 2)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise DataConfigError(f"loader: seed must be an integer, got {seed!r}")
        self.seed = seed
        if rank >= world_size:
            raise DataConfigError(f"loader: rank {rank} is not below world_size {world_size}")
        if batch_size % world_size:
            raise DataConfigError(f"loader: batch_size {batch_size} (the global batch) is not divisible "
                                  f"by world_size {world_size}")
        self.local_batch_size = batch_size // world_size
        if on_exhausted not in ON_EXHAUSTED:
            raise DataConfigError(f"loader: on_exhausted must be one of {ON_EXHAUSTED}, got {on_exhausted!r}")
        if max_epochs is not None:
            _check_int("max_epochs", max_epochs, 1)
        elif on_exhausted == "stop":
            max_epochs = 1
        self.on_exhausted, self.max_epochs = on_exhausted, max_epochs
        self.prefetch = _check_int("prefetch", prefetch, 0)
        self.workers = _check_int("workers", workers, 0)
        if workers > self.local_batch_size:
            raise DataConfigError(f"loader: workers {workers} exceeds the per-rank batch {self.local_batch_size} "
                                  f"(each worker process produces some of this rank's rows)")
        self.read_batch = _check_int("read_batch", read_batch, 1)
        self.mix_jitter = float(seq_len if mix_jitter is None else mix_jitter)
        if self.mix_jitter < 0:
            raise DataConfigError(f"loader: mix_jitter must be >= 0, got {mix_jitter!r}")
        self.packing = packing
        self.options = dict(options)

        all_sources = normalize_sources(sources)
        for s in all_sources:
            if s.weight == 0:
                logger.info("source %r has weight 0 and is left out", s.name)
        self.sources = [s for s in all_sources if s.weight > 0]
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        if kind == "pretrain":
            self.processor = PretrainProcessor(
                self.tokenizer, add_bos=options["add_bos"], add_eos=options["add_eos"],
                max_doc_tokens=options["max_doc_tokens"], long_doc_policy=options["long_doc_policy"])
        else:
            self.processor = SFTProcessor(self.tokenizer, max_tokens=options["max_example_tokens"],
                                          truncation=options["truncation"], loss_on=options["loss_on"])
        self.rows = range(self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size)
        if _rows is not None:  # a worker process producing part of a rank's rows
            self.rows = _rows
        # What a worker process needs to build the same loader (everything here pickles).
        self._spec = {"kind": kind, "sources": None, "tokenizer": self.tokenizer, "seq_len": seq_len,
                      "batch_size": batch_size, "seed": seed, "rank": rank, "world_size": world_size,
                      "packing": packing, "options": dict(options), "on_exhausted": on_exhausted,
                      "max_epochs": max_epochs, "mix_jitter": mix_jitter, "read_batch": read_batch}
        self.fingerprint = {
            "kind": kind,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "sources": [[s.name, float(s.weight)] for s in self.sources],
            "packing": packing,
            "options": {k: options[k] for k in sorted(options)},
            "on_exhausted": on_exhausted,
            "max_epochs": max_epochs,
            "mix_jitter": self.mix_jitter,
            "tokenizer_vocab_size": self.tokenizer.vocab_size,
        }
        # Open every source now, so that a missing file or field, or a prepared source that does not
        # match its manifest or this tokenizer, fails before training starts.
        self._datasets = []
        for s in self.sources:
            self._datasets.append(self._open_source(s, validate))
        self._spec["sources"] = list(self.sources)
        self.groups = {s.name: source_groups(self._num_shards(ds), batch_size)
                       for s, ds in zip(self.sources, self._datasets)}
        if any(g > 1 for g in self.groups.values()):  # what a position means depends on it
            self.fingerprint["source_groups"] = dict(self.groups)
        if self.rank == 0 and world_size > 1 and _rows is None:
            self._report_reading()

        self._consumed_state: dict | None = None  # state after the last batch handed out
        self._streams: dict[int, RowStream] | None = None
        self._readers: list[SourceReader] = []
        self._step = 0
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._pool = None  # ProcessProducer when workers > 0
        self._finished = False

    def _open_source(self, s: SourceConfig, validate: bool):
        if is_prepared(s):
            if self.kind != "pretrain":
                raise DataConfigError(f"source {s.name!r}: prepared (indexed) sources hold pretraining documents; "
                                      f"SFT data is read from its jsonl/parquet/hub source")
            return PreparedSource(s.path, name=s.name, tokenizer=self.tokenizer)
        ds = open_dataset(s)
        if validate:
            check_local_records(s)
            check_fields(s, first_record(s, ds), self.processor.fields(s))
        return ds

    @staticmethod
    def _num_shards(ds) -> int:
        if isinstance(ds, PreparedSource):
            return len(ds.prefixes)
        return int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", None) or 1)

    def _report_reading(self) -> None:
        """Name the cost where ranks read more of a text source than they use."""
        for s, ds in zip(self.sources, self._datasets):
            if isinstance(ds, PreparedSource):
                continue  # each rank reads only its rows' documents
            G = self.groups[s.name]
            R = self.batch_size // G
            share = len({j // R for j in self.rows}) / G
            if share * self.world_size > 1.01:
                logger.warning(
                    "source %r: %d shard(s) and a global batch of %d give %d shard group(s), so each of the %d "
                    "ranks reads %.0f%% of it to use %.1f%%: %.0fx the reading (and download) it needs. "
                    "Prepare it with `ct-data tokenize` (each rank then reads only its documents), or give it a "
                    "shard count sharing more factors with the global batch",
                    s.name, self._num_shards(ds), self.batch_size, G, self.world_size, 100 * share,
                    100 / self.world_size, share * self.world_size)

    # ---------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._finished:
            raise StopIteration
        item = self._next_item()
        if isinstance(item, (_Failure, _End)):
            self._finished = True
            if self._pool is not None:  # the workers have nothing left to do
                self._pool.close()
                self._pool = None
            if isinstance(item, _Failure):
                raise item.exc
            raise StopIteration
        batch, state = item
        self._consumed_state = state
        return batch

    def _next_item(self):
        if self.workers:  # worker processes, each producing some of the rows
            if self._pool is None:
                from ct_data.workers import ProcessProducer

                self._pool = ProcessProducer(self, self._consumed_state)
                _LIVE.add(self)
            return self._pool.get()
        if self._streams is None:
            self._start(self._consumed_state)
        if self.prefetch == 0:
            return self._produce()
        if self._thread is None:
            self._launch()
        return self._queue.get()

    # ---------------------------------------------------------------- production
    def _start(self, state: dict | None) -> None:
        rows_state = {} if state is None else {int(j): r for j, r in state["rows"].items()}
        num_docs = {} if state is None else state.get("num_docs", {})
        self._step = 0 if state is None else int(state["step"])
        self._readers = []
        for s, ds in zip(self.sources, self._datasets):
            cursors = {j: int(rows_state[j]["cursors"].get(s.name, 0)) if j in rows_state else 0
                       for j in self.rows}
            self._readers.append(self._reader(s, ds, cursors, num_docs.get(s.name)))
        names = [s.name for s in self.sources]
        mode = self.packing
        self._streams = {}
        for j in self.rows:
            mixer = Mixer([s.weight for s in self.sources], seed=self.seed, row=j, jitter=self.mix_jitter)
            stream = RowStream(j, names=names, readers=self._readers, mixer=mixer, seq_len=self.seq_len,
                               pad_id=self.tokenizer.pad_id, mode=mode,
                               sft_lookahead=self.options.get("lookahead", 1))
            if j in rows_state:
                stream.load(rows_state[j])
            self._streams[j] = stream
        self._consumed_state = self._snapshot()  # what state_dict() returns until a batch is taken

    def _columns(self, always: bool = False) -> tuple[dict[str, np.ndarray], bool]:
        """The next batch of this loader's rows as arrays, and whether every row has ended. Then,
        unless ``always`` (a worker's block, which must pad while other blocks go on), no arrays
        are returned and the step does not count."""
        cols = Columns(len(self.rows), self.seq_len)
        reals = [self._streams[j].next_sequence(cols.row(i)) for i, j in enumerate(self.rows)]
        ended = not any(reals) and all(s.done for s in self._streams.values())
        if ended and not always:
            return {}, True
        arrays = {"input_ids": cols.ids, "labels": cols.labels, "position_ids": cols.pos, "document_ids": cols.doc,
                  # Global position of each row in the loader's order (the same for any world size).
                  SEQUENCE_INDEX: np.array([self._step * self.batch_size + j for j in self.rows], dtype=np.int64)}
        self._step += 1
        return arrays, ended

    def _reader(self, s: SourceConfig, ds, cursors: dict[int, int], num_docs):
        G = self.groups[s.name]
        R = self.batch_size // G

        def make(g: int, rows: range, curs: dict[int, int], n):
            if isinstance(ds, PreparedSource):
                return IndexedReader(s, ds.group(g, G), self.processor, num_rows=R, rows=rows, cursors=curs,
                                     max_epochs=self.max_epochs)
            part = ds if G == 1 else ds.shard(num_shards=G, index=g, contiguous=False)
            return SourceReader(s, part, self.processor, num_rows=R, rows=rows, cursors=curs, num_docs=n,
                                max_epochs=self.max_epochs, read_batch=self.read_batch)

        if G == 1:
            return make(0, self.rows, cursors, num_docs)
        return GroupedReader(make, groups=G, num_rows=self.batch_size, rows=self.rows, cursors=cursors,
                             num_docs=num_docs)

    def _produce(self) -> tuple[Batch, dict] | _End | _Failure:
        try:
            arrays, ended = self._columns()
            if ended:
                return _End()
            return {k: torch.from_numpy(v) for k, v in arrays.items()}, self._snapshot()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            return _Failure(e)

    def _snapshot(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "step": self._step,
            "num_docs": {s.name: n for s, r in zip(self.sources, self._readers)
                         if (n := r.num_docs_state()) is not None},
            "rows": {str(j): s.state() for j, s in self._streams.items()},
        }

    def _launch(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        q, stop = self._queue, self._stop

        ref = weakref.ref(self)

        def work() -> None:
            # Blocks on a full queue (no polling); close() or garbage collection of the loader
            # (the thread holds only a weak reference while it waits) drains the queue to wake it.
            while not stop.is_set():
                loader = ref()
                if loader is None:
                    return
                item = loader._produce()
                del loader
                q.put(item)
                if isinstance(item, (_End, _Failure)):
                    return

        self._thread = threading.Thread(target=work, name="ct_data-prefetch", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def close(self) -> None:
        """Stop the prefetch thread or worker processes; a later next() resumes after the last batch
        handed out."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    while True:
                        self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None
            self._queue = None
        self._streams = None  # rebuilt from the state of the last batch handed out

    def __del__(self):
        try:
            self._stop.set()
            if self._queue is not None:
                while True:
                    self._queue.get_nowait()
        except Exception:  # noqa: BLE001 - queue.Empty, or a half-built loader
            pass

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Where the loader stands after the last batch it handed out (a plain, JSON-able dict)."""
        if self._consumed_state is None:
            self._start(None)
        return jsonable(self._consumed_state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; it may hold more rows than this rank needs (see merge_states)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state: expected version {STATE_VERSION}, got "
                             f"{state.get('version') if isinstance(state, Mapping) else type(state).__name__}")
        fp = state.get("fingerprint", {})
        diff = sorted(k for k in set(fp) | set(self.fingerprint) if fp.get(k) != self.fingerprint.get(k))
        if diff:
            details = "; ".join(f"{k}: saved {fp.get(k)!r}, now {self.fingerprint.get(k)!r}" for k in diff)
            raise ValueError(f"loader state was saved by a loader built with other arguments ({details})")
        missing = [j for j in self.rows if str(j) not in state["rows"]]
        if missing:
            raise ValueError(f"loader state holds no entry for rows {missing[:8]} of rank {self.rank}; "
                             f"merge the states of all ranks (ct_data.merge_states) to change the world size")
        self.close()
        state = copy.deepcopy(dict(state))
        state["rows"] = {str(j): state["rows"][str(j)] for j in self.rows}
        self._consumed_state = state
        self._streams = None
        self._finished = False

    # ---------------------------------------------------------------- reporting
    def stats(self) -> dict:
        """Counts over this rank's rows up to the last batch handed out: documents, tokens,
        skipped documents by reason, truncations, epochs, packing efficiency."""
        if self._consumed_state is None:
            self._start(None)
        st = self._consumed_state
        rows = st["rows"]
        per_source: dict[str, dict] = {}
        for s in self.sources:
            agg: dict[str, Any] = {"docs": 0, "tokens": 0, "lost_tokens": 0, "truncated": 0, "split": 0,
                                   "skipped": {}}
            n = st["num_docs"].get(s.name)
            epoch = 0
            for j, r in rows.items():
                for k, v in r["stats"][s.name].items():
                    agg[k] += v
                for k, v in r["skipped"][s.name].items():
                    agg["skipped"][k] = agg["skipped"].get(k, 0) + v
                epoch = max(epoch, epoch_of(int(j), r["cursors"][s.name], self.batch_size, self.groups[s.name], n))
            agg["num_docs"] = n
            agg["epoch"] = epoch
            per_source[s.name] = agg
        seqs = sum(r["seqs"] for r in rows.values())
        real = sum(r["real_tokens"] for r in rows.values())
        total = seqs * self.seq_len
        return {
            "step": st["step"],
            "sequences": seqs,
            "tokens": total,
            "real_tokens": real,
            "packing_efficiency": real / total if total else 1.0,
            "sources": per_source,
        }


def jsonable(x: Any) -> Any:
    """A deep copy with arrays as lists. Snapshots keep carried tokens as (immutable) arrays, so
    taking one per batch costs no per-token work; the conversion happens only when saved."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def merge_states(states: Sequence[dict]) -> dict:
    """Combine the states of all ranks into one that any world size can load."""
    if not states:
        raise ValueError("merge_states: no state given")
    out = copy.deepcopy(dict(states[0]))
    for st in states[1:]:
        if st.get("fingerprint") != out.get("fingerprint") or st.get("step") != out.get("step"):
            raise ValueError("merge_states: states come from different loaders or steps")
        out["rows"].update(copy.deepcopy(st["rows"]))
        for k, v in st.get("num_docs", {}).items():
            if isinstance(v, dict):  # per shard group: each rank knows its groups'
                out["num_docs"][k] = {**out["num_docs"].get(k, {}), **v}
            else:
                out["num_docs"][k] = v
    return out


def build_pretrain_loader(
    sources: Sequence[SourceConfig | Mapping[str, Any]] | Mapping[str, Any],
    tokenizer: Tokenizer | str,
    seq_len: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    packing: str = "mixed",
    add_bos: bool = True,
    add_eos: bool = True,
    max_doc_tokens: int | str | None = "seq_len",
    long_doc_policy: str = "split",
    **kwargs: Any,
) -> PackedLoader:
    """Packed pretraining batches.

    ``packing``: "mixed" (documents of all sources share sequences) or "per_source" (each sequence
    from one source, the public recipe). ``max_doc_tokens`` caps a document (BOS/EOS included;
    default ``seq_len``; None = no cap); longer ones are split into separate documents ("split") or
    cut ("truncate", counted). Other keyword arguments: see PackedLoader (on_exhausted, max_epochs,
    mix_jitter, prefetch, read_batch, validate, workers).
    """
    if packing not in PRETRAIN_PACKING:
        raise DataConfigError(f"loader: packing must be one of {PRETRAIN_PACKING}, got {packing!r}")
    if long_doc_policy not in LONG_DOC_POLICIES:
        raise DataConfigError(f"loader: long_doc_policy must be one of {LONG_DOC_POLICIES}, got {long_doc_policy!r}")
    if max_doc_tokens == "seq_len":
        max_doc_tokens = seq_len
    elif max_doc_tokens is not None:
        _check_int("max_doc_tokens", max_doc_tokens, 2)
    options = {"add_bos": bool(add_bos), "add_eos": bool(add_eos), "max_doc_tokens": max_doc_tokens,
               "long_doc_policy": long_doc_policy}
    return PackedLoader("pretrain", sources, tokenizer, seq_len, batch_size, seed, rank, world_size,
                        packing=packing, options=options, **kwargs)


def build_sft_loader(
    sources: Sequence[SourceConfig | Mapping[str, Any]] | Mapping[str, Any],
    tokenizer: Tokenizer | str,
    seq_len: int,
    batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    packing: str = "packed",
    loss_on: str = "assistant",
    truncation: str = "drop",
    max_example_tokens: int | None = None,
    lookahead: int = 16,
    **kwargs: Any,
) -> PackedLoader:
    """Packed SFT batches in the LLaMA-3 chat format.

    ``loss_on``: "assistant" (labels only where the next token belongs to an assistant turn) or
    "all". ``truncation`` for examples longer than ``max_example_tokens`` (default ``seq_len``):
    "drop" (counted) or "truncate" (keep the start, i.e. the prompt; dropped if no assistant token
    is left). ``packing``: "packed" (best fit over ``lookahead`` examples, never splitting one) or
    "none" (one example per row).
    """
    if packing not in SFT_PACKING:
        raise DataConfigError(f"loader: SFT packing must be one of {SFT_PACKING}, got {packing!r}")
    if loss_on not in SFT_LOSS:
        raise DataConfigError(f"loader: loss_on must be one of {SFT_LOSS}, got {loss_on!r}")
    if truncation not in SFT_TRUNCATION:
        raise DataConfigError(f"loader: truncation must be one of {SFT_TRUNCATION}, got {truncation!r}")
    _check_int("seq_len", seq_len, 2)
    if max_example_tokens is None:
        max_example_tokens = seq_len
    _check_int("max_example_tokens", max_example_tokens, 2)
    if max_example_tokens > seq_len:
        raise DataConfigError(f"loader: max_example_tokens {max_example_tokens} exceeds seq_len {seq_len} "
                              f"(SFT examples are never split across rows)")
    _check_int("lookahead", lookahead, 1)
    options = {"loss_on": loss_on, "truncation": truncation, "max_example_tokens": max_example_tokens,
               "lookahead": lookahead}
    return PackedLoader("sft", sources, tokenizer, seq_len, batch_size, seed, rank, world_size,
                        packing=packing, options=options, **kwargs)

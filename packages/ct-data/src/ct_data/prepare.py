"""``ct-data tokenize``: a pretraining mixture's text sources -> pre-tokenized indexed shards.

One output shard per input shard (a file of a local source, or one of the ``num_shards`` pieces
``datasets`` streams a hub dataset in), written by a pool of worker processes. The documents of
the shards, in shard order, are exactly the documents the on-the-fly loader reads, in the same
order, with the same text extraction and skip rules: a prepared source gives the same batches as
its raw source (tested). A shard holds each document's text tokens only; the loader adds BOS/EOS
and splits long documents as its options say, so one preparation serves every packing choice.

Per source, ``OUT/<name>/`` gets ``00000.bin/.idx``, ... and ``manifest.json``. Resumable: a
worker renames a shard into place, then writes its sidecar ``00000.json`` (counts, sizes,
SHA-256); a rerun keeps every shard whose sidecar and files agree and does the rest. The manifest
is written first with ``complete: false`` (what the source, input files and tokenizer were, so a
rerun against other input is refused) and completed when every shard is there.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ct_data.config import DataConfigError, SourceConfig
from ct_data.indexed import IndexedWriter, bin_path, idx_path, token_dtype
from ct_data.prepared import FORMAT, MANIFEST, tokenizer_fingerprint
from ct_data.sources import extract_text, iter_record_batches, open_dataset, resolve_files

logger = logging.getLogger("ct_data")

SHARD_NAME = "{:05d}"
BATCH_DOCS = 512  # records per encode_batch call


@dataclasses.dataclass(frozen=True)
class Job:
    """One input shard of one source -> one output shard."""

    src: SourceConfig
    index: int
    of: int
    prefix: str
    dtype: str


# ----------------------------------------------------------------------------- planning
def describe_input(src: SourceConfig, num_shards: int) -> dict[str, Any]:
    """What the shards are made from; a rerun must see the same (local files: names and sizes)."""
    d: dict[str, Any] = {"path": src.path, "num_shards": num_shards}
    resolved = resolve_files(src)
    if resolved is not None and not src.path.startswith("hf://"):
        d["files"] = [{"path": os.path.abspath(f), "bytes": os.path.getsize(f)} for f in resolved[1]]
    else:
        d.update(subset=src.subset, split=src.split, revision=src.revision,
                 data_files=list(src.data_files) if isinstance(src.data_files, tuple) else src.data_files)
    return d


def _source_record(src: SourceConfig) -> dict[str, Any]:
    """The fields of a source that decide which documents a shard holds (not its weight)."""
    d = dataclasses.asdict(src)
    for k in ("weight", "notes", "name"):
        d.pop(k)
    return d


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def plan_source(src: SourceConfig, tokenizer, out: Path) -> tuple[dict, list[Job], list[dict]]:
    """The source's manifest header, the jobs still to run, and the shards already done."""
    if src.file_format == "indexed":
        raise DataConfigError(f"source {src.name!r}: already prepared (file_format: indexed)")
    ds = open_dataset(src)
    n = max(1, int(getattr(ds, "num_shards", 1) or 1))
    dtype = token_dtype(tokenizer.vocab_size)
    header = {"format": FORMAT, "name": src.name, "source": _source_record(src), "input": describe_input(src, n),
              "tokenizer": tokenizer_fingerprint(tokenizer), "dtype": dtype.name,
              "contents": "text tokens only: no BOS/EOS (the loader adds them)", "num_shards": n}
    header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
    out.mkdir(parents=True, exist_ok=True)
    old = out / MANIFEST
    if old.is_file():
        prev = json.loads(old.read_text())
        diff = [k for k in ("format", "source", "input", "tokenizer", "dtype") if prev.get(k) != header[k]]
        if diff:
            raise DataConfigError(f"{old}: prepared from other input ({', '.join(diff)} differ); remove "
                                  f"{out} or choose another --out")
    done, jobs = [], []
    for i in range(n):
        entry = _finished(out, i)
        if entry is not None:
            done.append(entry)
        else:
            jobs.append(Job(src, i, n, str(out / SHARD_NAME.format(i)), dtype.name))
    if not old.is_file() or jobs:
        _write_json(old, {**header, "complete": False, "done_shards": len(done), "shards": []})
    return header, jobs, done


def _finished(out: Path, i: int) -> dict | None:
    """The sidecar of shard i if the shard is complete (files present with the recorded sizes)."""
    name = SHARD_NAME.format(i)
    side = out / f"{name}.json"
    try:
        entry = json.loads(side.read_text())
    except (OSError, ValueError):
        entry = None
    if entry is None:
        m = out / MANIFEST  # a completed manifest (sidecars removed) lists it
        try:
            entry = next((s for s in json.loads(m.read_text()).get("shards", []) if s["name"] == name), None)
        except (OSError, ValueError):
            return None
        if entry is None:
            return None
    for f, key in ((bin_path(out / name), "bin_bytes"), (idx_path(out / name), "idx_bytes")):
        if not f.is_file() or f.stat().st_size != entry.get(key):
            return None
    return entry


# ----------------------------------------------------------------------------- one shard
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, progress) -> None:
    # One core per worker: the pool is the parallelism (Rust's own threads would oversubscribe).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER["tokenizer"] = tokenizer
    _WORKER["progress"] = progress


def run_job(job: Job) -> dict:
    """Tokenize one input shard into one output shard; returns its manifest entry."""
    tok, progress = _WORKER["tokenizer"], _WORKER.get("progress")
    src = job.src
    ds = open_dataset(src)
    if job.of > 1:
        ds = ds.shard(num_shards=job.of, index=job.index)
    writer = IndexedWriter(job.prefix, np.dtype(job.dtype))
    skipped: dict[str, int] = {}
    last = time.monotonic()
    pending = [0, 0]
    try:
        for records in iter_record_batches(src, ds, 0, BATCH_DOCS):
            texts = []
            for r in records:
                t = extract_text(src, r)
                if isinstance(t, tuple):
                    skipped[t[0]] = skipped.get(t[0], 0) + 1
                else:
                    texts.append(t)
            if not texts:
                continue
            encoded = tok.encode_batch(texts)
            lengths = [len(e) for e in encoded]
            flat = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int64, count=sum(lengths))
            writer.add_many(flat, lengths)
            pending[0] += len(lengths)
            pending[1] += len(flat)
            if progress is not None and time.monotonic() - last > 0.5:
                progress.put((src.name, *pending))
                pending, last = [0, 0], time.monotonic()
    except BaseException:
        writer.abort()
        raise
    if progress is not None and pending[0]:
        progress.put((src.name, *pending))
    entry = {"name": Path(job.prefix).name, "input_shard": job.index, **writer.finish(), "skipped": skipped}
    _write_json(Path(job.prefix + ".json"), entry)  # the shard is complete once this exists
    return entry


# ----------------------------------------------------------------------------- the whole run
class Progress:
    """One status line on stderr: shards done, documents, tokens, tokens/s."""

    def __init__(self, total_shards: int, done_shards: int, stream=None, every: float = 0.5):
        self.total, self.done = total_shards, done_shards
        self.docs = self.tokens = 0
        self.t0 = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every if self.tty else 10.0
        self._last = 0.0

    def add(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        dt = max(now - self.t0, 1e-9)
        width = 24
        fill = int(width * self.done / max(self.total, 1))
        line = (f"tokenize [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} shards, "
                f"{self.docs:,} docs, {self.tokens:,} tokens, {self.tokens / dt / 1e6:.2f}M tokens/s, {dt:.0f} s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if force and self.tty:
            self.stream.write("\n")
        self.stream.flush()


def _complete(out: Path, header: dict, entries: list[dict]) -> dict:
    entries = sorted(entries, key=lambda e: e["input_shard"])
    skipped: dict[str, int] = {}
    for e in entries:
        for k, v in e["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    totals = {k: sum(e[k] for e in entries) for k in ("docs", "tokens", "bin_bytes", "idx_bytes")}
    manifest = {**header, "complete": True, "done_shards": len(entries), "totals": {**totals, "skipped": skipped},
                "shards": entries}
    _write_json(out / MANIFEST, manifest)
    for e in entries:  # the manifest now holds what the sidecars said
        (out / f"{e['name']}.json").unlink(missing_ok=True)
    return manifest


def tokenize_sources(sources: Sequence[SourceConfig], tokenizer, out_dir: str | os.PathLike, *,
                     workers: int | None = None, progress_stream=None,
                     on_job_done: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Prepare every source under ``out_dir/<name>``; returns each source's manifest.

    ``workers``: processes (default: the CPU count); 0 runs in this process (tests, debugging).
    """
    out_root = Path(out_dir)
    workers = (os.cpu_count() or 1) if workers is None else workers
    plans = {}
    for s in sources:
        plans[s.name] = plan_source(s, tokenizer, out_root / s.name)
    jobs = [j for _, js, _ in plans.values() for j in js]
    results: dict[str, list[dict]] = {name: list(done) for name, (_, _, done) in plans.items()}
    bar = Progress(sum(h["num_shards"] for h, _, _ in plans.values()), sum(len(d) for d in results.values()),
                   progress_stream)
    if jobs:
        logger.info("tokenize: %d shard(s) to write, %d already done", len(jobs), bar.done)

    def finished(job: Job, entry: dict) -> None:
        results[job.src.name].append(entry)
        bar.done += 1
        if on_job_done is not None:
            on_job_done(entry)

    if workers <= 0:
        _init_worker(tokenizer, None)
        for job in jobs:
            entry = run_job(job)
            bar.add(entry["docs"], entry["tokens"])
            finished(job, entry)
            bar.show()
    elif jobs:
        _run_pool(jobs, tokenizer, min(workers, len(jobs)), bar, finished)
    bar.show(force=True)
    return {name: _complete(out_root / name, plans[name][0], results[name]) for name in plans}


def _run_pool(jobs: list[Job], tokenizer, workers: int, bar: Progress, finished) -> None:
    ctx = multiprocessing.get_context("spawn")  # fork after Rust threads have run can deadlock
    queue = ctx.Queue()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(tokenizer, queue)) as pool:
        futures = {pool.submit(run_job, j): j for j in jobs}
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
                _drain(queue, bar)
                for f in done:
                    finished(futures[f], f.result())  # re-raises a worker's error
                bar.show()
        except BaseException:
            # Ctrl-C or a failed shard: stop now, not after the running shards (a rerun redoes them).
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()
            raise
        finally:
            _drain(queue, bar)
            queue.close()
            queue.cancel_join_thread()


def _drain(queue, bar: Progress) -> None:
    import queue as _q

    while True:
        try:
            _, docs, tokens = queue.get_nowait()
        except _q.Empty:
            return
        bar.add(docs, tokens)


def prepared_mixture_dict(mixture, out_dir: str | os.PathLike, manifests: dict[str, dict]) -> dict:
    """The data YAML of the prepared mixture: same weights and loader options, indexed paths."""
    sources = []
    for s in mixture.sources:
        if s.name in manifests:
            sources.append({"name": s.name, "path": os.path.abspath(os.path.join(out_dir, s.name)),
                            "file_format": "indexed", "weight": s.weight})
        else:
            sources.append({k: v for k, v in dataclasses.asdict(s).items() if v is not None and k != "notes"})
    d = {"name": f"{mixture.name}_prepared" if mixture.name else "prepared", "kind": mixture.kind,
         "loader": dict(mixture.loader_options), "sources": sources,
         "notes": f"Prepared by ct-data tokenize from {mixture.name or 'a mixture'}; documents hold text "
                  f"tokens only, the loader adds BOS/EOS."}
    if mixture.tokenizer:
        d["tokenizer"] = mixture.tokenizer
    return d

"""A rank's batches produced in worker processes (``workers=N``): the loader off the training process.

Rows are independent streams (docs/ct-data.md, "Loader semantics"), so worker k builds the same
loader restricted to the k-th contiguous block of this rank's rows and changes no batch. Each worker
produces its rows' columns ahead into its own bounded queue (``prefetch`` items); the training
process takes one item per worker per step, joins the blocks and merges their row states. What runs
in the training process per step is a few array copies: no tokenising, no packing, no per-token
Python. For on-the-fly text (SFT, raw pretraining sources) this is also how one rank gets more
than one core of tokenising; prepared (memory-mapped) sources need so little that the default
prefetch thread suffices.

Workers are spawned (not forked: the tokenizer's Rust threads may already run), so the first batch
waits for them to import torch and open the sources (seconds).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import queue as _queue
import time
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("ct_data")

POLL_S = 0.5


def blocks(rows: range, n: int) -> list[range]:
    """``rows`` cut into n contiguous blocks whose sizes differ by at most one."""
    size, extra = divmod(len(rows), n)
    out, start = [], rows.start
    for k in range(n):
        stop = start + size + (k < extra)
        out.append(range(start, stop))
        start = stop
    return out


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.dumps(e)
        return e
    except Exception:  # noqa: BLE001 - an exception holding something unpicklable
        return RuntimeError(f"{type(e).__name__}: {e}")


def worker_main(spec: dict, rows: range, state: dict | None, q, stop) -> None:
    """Build the loader for ``rows`` and produce until told to stop (runs in the worker process)."""
    from ct_data.loader import PackedLoader

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return True
            except _queue.Full:
                continue
        return False

    try:
        loader = PackedLoader(**spec, prefetch=0, workers=0, validate=False, _rows=rows)
        if state is not None:
            loader.load_state_dict(state)
        loader._start(loader._consumed_state)
    except BaseException as e:  # noqa: BLE001 - handed to the training process
        put(("error", _picklable(e)))
        return
    while not stop.is_set():
        try:
            # Always a full block: rows that have ended pad, as they would in one process.
            arrays, ended = loader._columns(always=True)
            item = ("batch", arrays, ended, loader._snapshot())
        except BaseException as e:  # noqa: BLE001
            put(("error", _picklable(e)))
            return
        if not put(item):
            return


class ProcessProducer:
    """The worker processes of one loader, and the joining of their blocks."""

    def __init__(self, loader, state: dict | None):
        ctx = multiprocessing.get_context("spawn")
        self.stop = ctx.Event()
        self.blocks = blocks(loader.rows, loader.workers)
        self.queues = [ctx.Queue(maxsize=max(1, loader.prefetch)) for _ in self.blocks]
        self.procs = []
        for k, (rows, q) in enumerate(zip(self.blocks, self.queues)):
            p = ctx.Process(target=worker_main, args=(loader._spec, rows, state, q, self.stop), daemon=True,
                            name=f"ct_data-worker-{loader.rank}.{k}")
            p.start()
            self.procs.append(p)

    def _get(self, k: int):
        q, p = self.queues[k], self.procs[k]
        while True:
            try:
                return q.get(timeout=POLL_S)
            except _queue.Empty:
                if not p.is_alive():
                    return ("error", RuntimeError(f"loader worker {p.name} (rows {self.blocks[k].start}.."
                                                  f"{self.blocks[k].stop - 1}) died with exit code {p.exitcode}"))

    def get(self):
        from ct_data.loader import _End, _Failure

        items = []
        for k in range(len(self.procs)):
            item = self._get(k)
            if item[0] == "error":
                return _Failure(item[1])
            items.append(item)
        if all(ended for _, _, ended, _ in items):
            return _End()
        keys = items[0][1].keys()
        batch = {key: torch.from_numpy(np.concatenate([arrays[key] for _, arrays, _, _ in items]))
                 for key in keys}
        return batch, _merge([snap for _, _, _, snap in items])

    def close(self, timeout: float = 10.0) -> None:
        self.stop.set()
        deadline = time.monotonic() + timeout
        for q, p in zip(self.queues, self.procs):
            while p.is_alive() and time.monotonic() < deadline:
                try:  # a worker blocked on a full queue needs room to see the stop
                    while True:
                        q.get_nowait()
                except (_queue.Empty, OSError, ValueError):
                    pass
                p.join(timeout=0.1)
            if p.is_alive():  # stuck (a long read): it holds nothing worth waiting for
                p.terminate()
                p.join()
            q.close()
            q.cancel_join_thread()


def _merge(snaps: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(snaps[0])
    out["rows"] = {j: r for s in snaps for j, r in s["rows"].items()}
    out["num_docs"] = {k: v for s in snaps for k, v in s["num_docs"].items()}
    return out

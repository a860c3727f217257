"""A checkpoint-writer result queue whose server process dies with its rank.

megatron's dist_checkpointing writer reports each write through a multiprocessing Manager queue
that it starts on the first save (``filesystem_async.get_write_results_queue``). The Manager is a
separate server process that nothing stops when its rank is killed (kill -9, or torchrun ending a
job after another rank died): the orphan keeps running, holding the job's stdout/stderr pipes open
(so a launcher waiting on them hangs) and its memory. We start that Manager ourselves, with the
Linux parent-death signal set inside the server, and hand megatron its queue.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_manager: SyncManager | None = None


def _die_with_parent() -> None:
    """Runs in the Manager's server process: SIGKILL it when the rank that started it exits."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # no prctl: the server then lives as long as megatron's own would


def install_write_results_queue() -> None:
    """Give megatron's writer our queue before its first save (idempotent; Linux only)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not sys.platform.startswith("linux") or getattr(filesystem_async, "_results_queue", None) is not None:
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _manager.start(initializer=_die_with_parent)
    filesystem_async._results_queue = _manager.Queue()


def _host_copy(write_buckets: list) -> list:
    """megatron's write buckets with every tensor copied to host memory now. megatron's own
    preload (``preload_tensors``) moves GPU tensors to the host but leaves host tensors as they
    are: on the CPU it would write whatever the training loop has made of them by then."""
    copied = []
    for file_name, storage_key, (bytes_data, tensor_data) in write_buckets:
        tensors = [(item, tensor.detach().to("cpu", copy=True)) for item, tensor in tensor_data]
        copied.append((file_name, storage_key, (bytes_data, tensors)))  # bytes_data: serialised at planning
    return copied


class AsyncSave:
    """A megatron dist_checkpointing save in flight (``save(..., async_sharded_save=True)``'s
    AsyncRequest). The state is copied to host memory when this is made; a thread of this process
    writes this rank's files (megatron's own writer, its threads and results queue);
    ``finalize``, which every rank calls on the main thread once all are ``done``, runs megatron's
    finalisation: the coordinator gathers the write results and writes ``.metadata`` and
    ``metadata.json`` (collectives on the default group, hence not from the thread).

    Instead of megatron's AsyncCallsQueue, which forks a writer process and checks completion
    with CUDA tensors: the checkpoint manager decides when to finalise."""

    def __init__(self, request):
        import threading

        self._request = request
        self._error: BaseException | None = None
        args = list(request.async_fn_args)
        if request.async_fn is not None:
            args[1] = _host_copy(args[1])  # (rank, write_buckets, results_queue)
        self._thread = threading.Thread(target=self._write, args=(args,), name="megatron-ckpt-write", daemon=True)
        self._thread.start()

    def _write(self, args: list) -> None:
        try:
            if self._request.async_fn is not None:  # None: nothing of this rank's to write
                self._request.async_fn(*args, **self._request.async_fn_kwargs)
        except BaseException as err:  # re-raised by result()
            self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> None:
        """Wait for this rank's files; raise what the write raised."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def finalize(self) -> None:
        """Collective, main thread, after every rank's ``result``: the metadata, last."""
        for fn in self._request.finalize_fns:
            fn()

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

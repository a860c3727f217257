"""Helpers for the cross-package CLI tests (imported by them; conftest puts this dir on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_SCALE = 0.1

# Small enough to run in seconds on 2 cores, big enough to see the loss fall.
TINY = [
    "trainer.max_steps=6", "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "seq_len=64",
    "trainer.checkpoint_every=2", "trainer.log_every=1", "logging.progress=false",
    f"sample_data.scale={SAMPLE_SCALE}",
]


def ct(command: str, *args: str, check: bool = True, timeout: int = 600, env: dict | None = None,
       module_runner: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run a ct-cli entry point (``python -m ct_cli.<command>``) and capture its output."""
    runner = module_runner or [sys.executable, "-m"]
    result = subprocess.run([*runner, f"ct_cli.{command}", *args], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"ct {command} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def train_losses(run_dir: Path) -> dict[int, float]:
    from ct_stages.metrics import read_losses

    return read_losses(run_dir / "metrics.jsonl")


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    """Block until the run in ``proc`` has logged ``step`` (fails if it ends or times out first)."""
    import time

    deadline = time.time() + timeout
    while max(train_losses(run_dir) or {0: 0}) < step:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"run did not reach step {step} within {timeout} s")
        time.sleep(0.05)


def wait_for_event(proc: subprocess.Popen, run_dir: Path, event: str, timeout: float = 300) -> None:
    """Block until the run in ``proc`` has logged a record of kind ``event`` (fails if it ends first)."""
    import time

    deadline = time.time() + timeout
    while not (run_dir / "metrics.jsonl").is_file() or not any(e["event"] == event for e in _events_so_far(run_dir)):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a {event!r} record: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError(f"no {event!r} record within {timeout} s")
        time.sleep(0.05)


def _events_so_far(run_dir: Path) -> list[dict]:
    """The complete lines of a metrics file still being written (a torn last line is skipped)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_rank_one_mid_run(argv: list[str], run: Path) -> None:
    """Start ``argv`` (a 2-process run), SIGKILL its rank-1 worker once a checkpoint is complete,
    and check every process exits non-zero within 60 s and what checkpoints remain verify."""
    import os
    import signal
    import subprocess
    import time

    import psutil

    from ct_stages import CheckpointManager

    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run, 1)
    # A checkpoint must have completed (an async write may still be running on a loaded machine),
    # so that the rerun has one to resume from; the kill still lands mid-run.
    wait_for_event(proc, run, "checkpoint_complete")
    # The rank-1 worker itself, not a process it forked (megatron's checkpoint writers inherit its
    # environment): the one whose parent is not rank 1.
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("LOCAL_RANK") == "1" and p.parent().environ().get("LOCAL_RANK") != "1"]
    assert workers, "no rank-1 worker found"
    descendants = psutil.Process(proc.pid).children(recursive=True)
    killed_at = time.time()
    os.kill(workers[0].pid, signal.SIGKILL)
    proc.communicate(timeout=90)  # also waits for every holder of its stderr pipe
    assert proc.returncode != 0 and time.time() - killed_at < 60
    # Nothing the job started outlives it (ranks, their checkpoint writers and helpers).
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    CheckpointManager(run / "checkpoints").latest_verified()  # whatever is there verifies

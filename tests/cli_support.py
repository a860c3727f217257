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

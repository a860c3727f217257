"""The run directory as a contract: what a rerun may change, when a run is finished, and who holds it.

A run_dir that holds a checkpoint or a summary.json holds a run. Its saved configuration
(``config.json`` and ``model_config.json``) is the contract: a rerun compares what it would build
(``CONTRACT_KEYS`` and the resolved model) with it before anything is written, and a difference
exits 2 naming each key, its saved and new values, and the two ways out (the saved values, or a
new run_dir). Everything else (steps, learning rate, micro-batch, layout, logging) may change on a
resume. A run whose summary.json reports at least ``trainer.max_steps`` steps is finished: a rerun
says so and changes nothing.

One process at a time trains in a run_dir: ``RunDirLock`` (an advisory ``flock`` on
``run_dir/.lock``, held by global rank 0, released on exit and by the kernel when the process
dies, so a crashed run leaves no lock that blocks the next one).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from ct_model import UserError

from .metrics import strict_json

log = logging.getLogger("ct_stages")

# Keys of RunConfig.to_dict() that a resume cannot change without training another run: the data
# (sources, order, batch), the tokenizer, the context and the loss. The model is compared field by
# field against model_config.json (the resolved model, whatever preset or init_from gave it).
CONTRACT_KEYS = ("tokenizer", "data", "sample_data.seed", "sample_data.scale", "trainer.global_batch_size",
                 "trainer.seed", "seq_len", "rope_theta_scale", "stage.kind", "distributed.engine")
LOCK_NAME = ".lock"


class RunDirError(UserError):
    """The run_dir cannot take this run: another configuration, another process, not writable."""


# ------------------------------------------------------------------------------------ contract


def holds_a_run(run_dir: Path) -> bool:
    """A checkpoint directory or a summary.json: something a rerun would resume or report."""
    if (run_dir / "summary.json").is_file():
        return True
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir())


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts and lists as dotted keys (``data.sources.0.path``), the way overrides name them."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    if isinstance(value, (list, tuple)):
        out = {}
        for i, sub in enumerate(value):
            out.update(flatten(sub, f"{prefix}.{i}"))
        return out or {prefix: []}
    return {prefix: value}


def _pick(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def contract_values(run_dict: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The flattened values a rerun must keep: CONTRACT_KEYS of the run and every model field."""
    out: dict[str, Any] = {}
    for key in CONTRACT_KEYS:
        out.update(flatten(_pick(run_dict, key), key))
    out.update(flatten({k: v for k, v in model.items() if k != "name"}, "model"))
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path}: unreadable ({type(err).__name__}: {err}); it records the run in "
                          f"{path.parent}: restore it, or choose a new run_dir") from err
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a JSON object; restore it, or choose a new run_dir")
    return value


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value) if not isinstance(value, str) else value}"


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every key whose value differs, in key order."""
    missing = object()
    out = []
    for key in sorted(set(saved) | set(now)):
        old, new = saved.get(key, missing), now.get(key, missing)
        if old != new:
            out.append((key, None if old is missing else old, None if new is missing else new))
    return out


def check_saved_run(run_dir: Path, run_dict: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse, naming each key, a rerun whose data, tokenizer, batch, context, loss or model
    differ from the run saved in ``run_dir``. Reads only; nothing is written."""
    if not run_dir.is_dir() or not holds_a_run(run_dir):
        return
    config_path, model_path = run_dir / "config.json", run_dir / "model_config.json"
    if not config_path.is_file() or not model_path.is_file():
        log.warning("%s holds checkpoints but no config.json/model_config.json: the rerun's configuration "
                    "cannot be compared with the saved run's", run_dir)
        return
    saved_run = _read_json(config_path)
    saved = contract_values(saved_run, _read_json(model_path))
    diff = differences(saved, contract_values(run_dict, model))
    if not diff:
        return
    old_preset, new_preset = _pick(saved_run, "model.preset"), _pick(run_dict, "model.preset")
    if old_preset != new_preset and any(k.startswith("model.") for k, _, _ in diff):
        # Another preset: named first, and model.preset=OLD is the way back (not its 20 fields).
        diff = [("model.preset", old_preset, new_preset)] + [d for d in diff if not d[0].startswith("model.")] + \
               [d for d in diff if d[0].startswith("model.")]
    shown = "; ".join(f"{k}: saved {v_old!r}, now {v_new!r}" for k, v_old, v_new in diff[:12])
    more = f"; ... ({len(diff)} keys in all)" if len(diff) > 12 else ""
    preset_changed = diff[0][0] == "model.preset"
    back = [(k, v) for k, v, _ in diff if v is not None and not (preset_changed and k.startswith("model.")
                                                                   and k != "model.preset")]
    keep = " ".join(_override(k, v) for k, v in back[:6])
    raise RunDirError(
        f"run_dir={run_dir} holds a run with another configuration ({shown}{more}; saved in {config_path.name} "
        f"and {model_path.name}). To resume it, rerun with the saved values{f' ({keep})' if keep else ''}; "
        f"to train this configuration, choose a new run_dir=")


def finished_summary(run_dir: Path, max_steps: int) -> dict[str, Any] | None:
    """summary.json of a run that reached ``max_steps`` (None: not finished, or no summary)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = _read_json(path)
    steps = summary.get("steps")
    return summary if isinstance(steps, int) and steps >= max_steps else None


# ------------------------------------------------------------------------------------ writing


def make_run_dir(run_dir: Path) -> bool:
    """Create ``run_dir`` (and its parents); True when it did not exist. A path that is a file, or
    that cannot be written (read-only file system, permissions), exits 2 naming it."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir={run_dir} is a file, not a directory; choose another run_dir=")
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"run_dir={run_dir}: cannot create it ({_reason(err)}); choose a writable run_dir=") from err
    return created


def _reason(err: OSError) -> str:
    return (err.strerror or type(err).__name__) if err.errno else str(err)


def write_json(path: Path, value: Any) -> None:
    """Strict JSON (non-finite numbers as null), written to a temporary name and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(strict_json(value, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"{path}: cannot write it ({_reason(err)}); free space or fix permissions, then "
                          "run the same command again") from err


# ------------------------------------------------------------------------------------ lock


class RunDirLock:
    """Exclusive use of a run_dir by one process (global rank 0 of a job): ``fcntl.flock`` on
    ``run_dir/.lock``, which records the holder's host, pid and start time. The kernel drops the
    lock when the holder dies, so a crash leaves a stale file that the next run takes over."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RunDirError(f"run_dir={self.path.parent}: cannot write there ({_reason(err)}); "
                                  "choose a writable run_dir=") from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirError(f"{self.path}: cannot lock it ({_reason(err)})") from err
                raise RunDirError(f"run_dir={self.path.parent} is in use by another run ({self.holder()}); "
                                  "wait for it to end, or choose another run_dir=") from None
            if self._same_file(fd):
                break
            os.close(fd)  # the previous holder removed the file between our open and lock: again
        previous = self.holder()
        if previous != "holder unknown":
            log.info("%s: taking over the lock of a run that ended without releasing it (%s)", self.path, previous)
        self._fd = fd
        self._write_holder(fd)
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _write_holder(fd: int) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)

    def holder(self) -> str:
        """Who holds (or last held) the lock, in words."""
        try:
            record = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            record = {}
        if not record.get("pid"):
            return "holder unknown"
        return f"pid {record['pid']} on host {record.get('host', '?')}, since {record.get('since', '?')}"

    def release(self) -> None:
        """Remove the file while still holding it, then unlock (a waiting run re-checks the inode)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class NoLock:
    """What ranks other than 0 hold: nothing (rank 0 holds the job's lock)."""

    held = False

    def release(self) -> None:
        pass

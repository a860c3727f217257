"""Resumable checkpoints, written atomically: a killed run never leaves one that looks complete.

Layout: ``<root>/step_00000042/`` holding ``engine/`` (model + optimizer, written by the engine:
torch.distributed.checkpoint for native engines, megatron dist_checkpointing for megatron),
``trainer_rank{r}.pt`` (scheduler, data-loader state, RNG states, step, consumed tokens: one per
rank because loader and RNG state are per rank) and ``meta.json`` (step, world size, engine kind
and layout, and the manifest: every file's size and sha256), written last. Everything is written
under ``.tmp-step_00000042`` and renamed at the end; only names matching ``step_*`` with a
meta.json count, and a resume takes the newest one whose files match its manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from ct_model import UserError
from ct_parallel import barrier as _barrier, global_rank as _rank, world_size as _world_size

log = logging.getLogger("ct_stages")
STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError):
    """A checkpoint cannot be used (unreadable, or written by another layout); names the path."""


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is not initialised: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointManager:
    """``metadata``: what meta.json records besides step and world size: the engine kind and its
    parallel layout (so ct-export and a resume know how the engine/ directory was written)."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 2, metadata: dict[str, Any] | None = None):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last_checkpoints must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.metadata = dict(metadata or {"engine": "native"})
        self._pending: _Pending | None = None

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def latest_verified(self) -> Path | None:
        """The newest complete checkpoint whose files match its manifest. Damaged ones (a file
        missing, truncated or changed) are skipped with a warning naming the file; if checkpoints
        exist but none verifies, CheckpointError lists what is wrong with each."""
        problems = []
        for path in reversed(self.complete()):
            issues = verify(path)
            if not issues:
                if problems:
                    log.warning("resuming from %s, the newest checkpoint that verifies", path)
                return path
            log.warning("checkpoint %s is damaged, skipped: %s", path, "; ".join(issues))
            problems.append(f"{path}: {'; '.join(issues)}")
        if problems:
            raise CheckpointError("no checkpoint verifies against its manifest: " + " | ".join(problems) +
                                  ". Move the damaged ones aside to start afresh")
        return None

    def save(self, step: int, engine, trainer_state: dict[str, Any], *, asynchronous: bool = False) -> Path:
        """Collective: every rank calls it with its own trainer_state.

        ``asynchronous``: the engine copies its state to memory and writes it in the background;
        this returns as soon as the copy is made. The checkpoint becomes complete (meta.json with
        the manifest, then the rename) only after every file is on disk: ``poll`` reports it,
        ``wait`` blocks for it (the next save, the end of training and every stop call it)."""
        self.wait()  # one checkpoint in flight at a time
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        try:
            if _rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
                tmp.mkdir()
            _barrier()
            # Before the engine's files: an async write's collectives then prove every rank has
            # written its trainer state by the time rank 0's write completes.
            torch.save(trainer_state, tmp / f"trainer_rank{_rank()}.pt")
            with _quiet_single_process():
                future = engine.save_checkpoint(str(tmp / "engine"), asynchronous=asynchronous) \
                    if asynchronous else engine.save_checkpoint(str(tmp / "engine"))
        except BaseException as err:  # DCP wraps write errors in a BaseException
            self._raise_write_error(err, step, tmp)
        if future is None:
            _barrier()
            if _rank() == 0:
                self._finalize(step, tmp, final)
            _barrier()
        else:
            self._pending = _Pending(step, tmp, final, future,
                                     self._finalize_when_written if _rank() == 0 else None)
        return final

    def poll(self) -> Path | None:
        """The async checkpoint that completed since the last call (rank 0; others: None)."""
        pending = self._pending
        if pending is None or not pending.done():
            return None
        self._pending = None
        pending.result(self._raise_write_error)
        return pending.final if _rank() == 0 else None

    def wait(self) -> Path | None:
        """Block until the async checkpoint in flight (if any) is complete on this rank."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        pending.result(self._raise_write_error)
        return pending.final

    def _finalize_when_written(self, pending: "_Pending") -> None:
        # Rank 0's background write finishes only after DCP has gathered every rank's write
        # results, so all files of the step are on disk here.
        pending.future.result()
        self._finalize(pending.step, pending.tmp, pending.final)

    def _finalize(self, step: int, tmp: Path, final: Path) -> None:
        """Rank 0: meta.json (with the manifest) last, then the rename that makes it count."""
        meta = {"step": step, "world_size": _world_size(), **self.metadata, "files": manifest(tmp)}
        (tmp / "meta.json.tmp").write_text(json.dumps(meta) + "\n")
        os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune()

    def _raise_write_error(self, err: BaseException, step: int, tmp: Path):
        if isinstance(err, (KeyboardInterrupt, SystemExit)) or not _is_write_error(err):
            raise err
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial step behind
        raise CheckpointError(f"cannot write the step-{step} checkpoint under {self.root}: {_cause(err)}; "
                              f"the previous checkpoints are untouched. Free space or fix permissions, "
                              f"then run the same command again to resume") from err

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, engine) -> dict[str, Any]:
        """Restore engine state from ``path`` and return this rank's trainer state."""
        meta = read_meta(path)
        saved_world, world = meta["world_size"], _world_size()
        self._check_resumable(path, meta)
        same_layout = saved_world == world and meta.get("layout") == self.metadata.get("layout")
        try:
            with _quiet_single_process():
                engine.load_checkpoint(str(path / "engine"))  # DCP / dist_checkpointing reshard
            if same_layout:
                return torch.load(path / f"trainer_rank{_rank()}.pt", weights_only=False)
            return _reshard_trainer_state(path, saved_world)
        except BaseException as err:  # DCP's CheckpointException derives from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                                  f"move it aside to resume from an older checkpoint") from err

    def _check_resumable(self, path: Path, meta: dict[str, Any]) -> None:
        """Refuse, naming the keys, the layout changes no engine can resume across here."""
        engine = self.metadata.get("engine")
        if meta.get("engine", "native") != engine:
            raise CheckpointError(f"{path}: written by the {meta.get('engine')} engine, this run uses the "
                                  f"{engine} engine (distributed.engine)")
        if engine != "megatron":
            return
        if meta["world_size"] != _world_size():
            raise CheckpointError(
                f"{path}: written by {meta['world_size']} processes, resuming with {_world_size()}; the megatron "
                "engine resumes at its own world size (another TP/PP split of it is fine); to change the "
                "world size load the weights into a new run with init_from")
        saved, now = meta.get("layout") or {}, self.metadata.get("layout") or {}
        distopt = saved.get("use_distributed_optimizer") or now.get("use_distributed_optimizer")
        if saved != now and distopt and not torch.cuda.is_available():
            raise CheckpointError(
                f"{path}: the distributed optimizer's state is resharded to another layout on GPU only "
                f"(megatron-core's reshardable format is verified there, not on CPU); resume with the saved "
                f"distributed layout ({_layout_keys(saved)}) or start a new run with init_from")


def _layout_keys(layout: dict[str, Any]) -> str:
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "use_distributed_optimizer")
    return ", ".join(f"distributed.{k}={layout.get(k)}" for k in keys)


class _Pending:
    """An async checkpoint in flight: the engine's write future and, on rank 0, a thread that
    finalises the step (manifest, rename) once the write is done."""

    def __init__(self, step: int, tmp: Path, final: Path, future, finalize=None):
        self.step, self.tmp, self.final, self.future = step, tmp, final, future
        self.thread = None
        self.error: BaseException | None = None
        if finalize is not None:
            self.thread = threading.Thread(target=self._run, args=(finalize,), name=f"ckpt-{step}", daemon=True)
            self.thread.start()

    def _run(self, finalize) -> None:
        try:
            finalize(self)
        except BaseException as err:  # re-raised in the training thread by result()
            self.error = err

    def done(self) -> bool:
        return self.thread.is_alive() is False if self.thread is not None else self.future.done()

    def result(self, on_error) -> None:
        try:
            if self.thread is not None:
                self.thread.join()
                if self.error is not None:
                    raise self.error
            else:
                self.future.result()
        except BaseException as err:
            on_error(err, self.step, self.tmp)


def _is_write_error(err: BaseException) -> bool:
    """An OSError (disk full, read-only, permissions), possibly wrapped by DCP."""
    return isinstance(err, OSError) or "OSError" in str(err) or "No space left" in str(err)


def _cause(err: BaseException) -> str:
    text = str(err)
    for line in text.splitlines():
        if "Error" in line and ":" in line:
            return line.strip()[:300]
    return f"{type(err).__name__}: {text[:300]}"


def _reshard_trainer_state(path: Path, saved_world: int) -> dict[str, Any]:
    """This rank's trainer state from a checkpoint written at another world size or layout: step,
    schedule and counters are the same on every rank; the loader states of the saved
    data-parallel ranks (one each: tensor and pipeline ranks share theirs) are merged, and the
    layout-invariant loader then takes this rank's rows of it; the RNG state is this rank's if it
    was saved, else rank 0's (no stage draws random numbers)."""
    from ct_data import merge_states

    states = [torch.load(path / f"trainer_rank{r}.pt", weights_only=False) for r in range(saved_world)]
    per_dp_rank = {s.get("dp_rank", r): s["loader"] for r, s in enumerate(states)}
    mine = states[_rank()] if _rank() < saved_world else states[0]
    log.info("%s: written by %d processes (%d data-parallel), resuming with %d (loader states merged)", path,
             saved_world, len(per_dp_rank), _world_size())
    return {**mine, "loader": merge_states([per_dp_rank[d] for d in sorted(per_dp_rank)])}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``directory``: relative path -> size and sha256."""
    return {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(directory.rglob("*")) if p.is_file()}


def verify(path: Path) -> list[str]:
    """What does not match the checkpoint's manifest (empty: it verifies). Checkpoints written
    before manifests existed have none and verify trivially."""
    try:
        expected = read_meta(path).get("files")
    except CheckpointError as err:
        return [str(err)]
    if expected is None:
        return []
    issues = []
    for name, want in expected.items():
        file = path / name
        if not file.is_file():
            issues.append(f"{file}: missing")
        elif file.stat().st_size != want["size"]:
            issues.append(f"{file}: {file.stat().st_size} bytes, expected {want['size']} (truncated?)")
        elif _sha256(file) != want["sha256"]:
            issues.append(f"{file}: checksum differs from the manifest")
    return issues


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint directory (step, world_size, engine, layout)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / 'meta.json'}: unreadable checkpoint metadata ({err})") from err
    return meta

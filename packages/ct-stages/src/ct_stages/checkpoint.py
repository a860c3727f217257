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

    def save(self, step: int, engine, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own trainer_state."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        try:
            if _rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
                tmp.mkdir()
            _barrier()
            with _quiet_single_process():
                engine.save_checkpoint(str(tmp / "engine"))
            torch.save(trainer_state, tmp / f"trainer_rank{_rank()}.pt")
        except BaseException as err:  # DCP wraps write errors in a BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)) or not _is_write_error(err):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial step behind
            raise CheckpointError(f"cannot write the step-{step} checkpoint under {self.root}: {_cause(err)}; "
                                  f"the previous checkpoints are untouched. Free space or fix permissions, "
                                  f"then run the same command again to resume") from err
        _barrier()
        if _rank() == 0:
            # meta.json is written last and holds the manifest: its presence means complete.
            meta = {"step": step, "world_size": _world_size(), **self.metadata, "files": manifest(tmp)}
            (tmp / "meta.json.tmp").write_text(json.dumps(meta) + "\n")
            os.replace(tmp / "meta.json.tmp", tmp / "meta.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, path: Path, engine) -> dict[str, Any]:
        """Restore engine state from ``path`` and return this rank's trainer state."""
        meta = read_meta(path)
        saved_world, world = meta["world_size"], _world_size()
        if meta.get("engine", "native") != self.metadata.get("engine"):
            raise CheckpointError(f"{path}: written by the {meta.get('engine')} engine, this run uses the "
                                  f"{self.metadata.get('engine')} engine (distributed.engine)")
        if saved_world != world and self.metadata.get("engine") != "native":
            raise CheckpointError(
                f"{path}: written by {saved_world} processes, resuming with {world}; the megatron engine "
                "resumes at its own world size only (load the weights into a new run with init_from instead)")
        try:
            with _quiet_single_process():
                engine.load_checkpoint(str(path / "engine"))  # DCP reshards to this layout
            if saved_world == world:
                return torch.load(path / f"trainer_rank{_rank()}.pt", weights_only=False)
            return _reshard_trainer_state(path, saved_world)
        except BaseException as err:  # DCP's CheckpointException derives from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise CheckpointError(f"{path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:300]}); "
                                  f"move it aside to resume from an older checkpoint") from err


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
    """This rank's trainer state from a checkpoint written at another world size: step, schedule
    and counters are the same on every rank; the loader states of all saved ranks are merged
    (the loader is layout-invariant: each rank then takes its own rows of the merged state); the
    RNG state is this rank's if it was saved, else rank 0's (no stage draws random numbers)."""
    from ct_data import merge_states

    states = [torch.load(path / f"trainer_rank{r}.pt", weights_only=False) for r in range(saved_world)]
    mine = states[_rank()] if _rank() < saved_world else states[0]
    log.info("%s: written by %d processes, resuming with %d (loader states merged)", path, saved_world,
             _world_size())
    return {**mine, "loader": merge_states([s["loader"] for s in states])}


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

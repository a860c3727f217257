"""Resumable checkpoints, written atomically: a killed run never leaves one that looks complete.

Layout: ``<root>/step_00000042/`` holding ``engine/`` (model + optimizer, written by the engine:
torch.distributed.checkpoint for native engines, megatron dist_checkpointing for megatron),
``trainer_rank{r}.pt`` (scheduler, data-loader state, RNG states, step, consumed tokens: one per
rank because loader and RNG state are per rank) and ``meta.json`` (step, world size, engine kind
and layout, and the manifest: every file's size and sha256), written last. Everything is written
under ``.tmp-step_00000042`` and renamed at the end; only names matching ``step_*`` with a
meta.json count, and a resume takes the newest one whose files match its manifest.

No rank does O(checkpoint size) work alone: at a save each rank hashes the files it wrote and the
parts of the manifest (names, sizes, hashes) are gathered on rank 0, which writes meta.json; at a
resume each rank checks a share of the files (balanced by bytes) and one all-gather of the
findings makes every rank pick the same checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
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
import torch.distributed as dist
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
        self._group = None  # see _background_group

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
        exist but none verifies, CheckpointError lists what is wrong with each.

        Collective under torch.distributed: each rank checks its share of the files and the
        findings are all-gathered, so every rank returns the same checkpoint."""
        problems = []
        for path in reversed(self._agreed(self.complete())):
            issues = _verify_together(path)
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

    def _agreed(self, paths: list[Path]) -> list[Path]:
        """Rank 0's list of checkpoints for every rank: a shared file system may show a rank a
        directory listing that lags, and the ranks must walk the same candidates together."""
        names = _broadcast_from_first([p.name for p in paths])
        return [self.root / name for name in names]

    def save(self, step: int, engine, trainer_state: dict[str, Any], *, asynchronous: bool = False) -> Path:
        """Collective: every rank calls it with its own trainer_state.

        ``asynchronous``: the engine copies its state to memory and writes it in the background;
        this returns as soon as the copy is made. The checkpoint becomes complete (meta.json with
        the manifest, then the rename) only after every file is on disk and hashed: ``poll``
        reports it, ``wait`` blocks for it (the next save, the end of training and every stop
        call it). The engine returns either a future of the whole write (DCP: done when every
        rank's files and the metadata are on disk) or, for a write whose last step is collective
        (megatron's: the coordinator gathers the write results and writes the metadata), a handle
        with ``done``/``result`` for this rank's files and a ``finalize`` that every rank calls on
        the main thread: ``poll`` then agrees on "all written" with one tiny all-reduce."""
        self.wait()  # one checkpoint in flight at a time
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        try:
            if _rank() == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
                tmp.mkdir()
            _barrier()
            torch.save(trainer_state, tmp / f"trainer_rank{_rank()}.pt")
            # Created here, on every rank in the same order, before the engine creates its own.
            group = self._background_group() if asynchronous else None
            with _quiet_single_process():
                future = engine.save_checkpoint(str(tmp / "engine"), asynchronous=asynchronous) \
                    if asynchronous else engine.save_checkpoint(str(tmp / "engine"))
        except BaseException as err:  # DCP wraps write errors in a BaseException
            self._raise_write_error(err, step, tmp)
        if future is None:
            self._complete_now(step, tmp, final)
        elif hasattr(future, "finalize"):
            self._pending = _Pending(step, tmp, final, future, self._hash_when_written)
        else:
            self._pending = _Pending(step, tmp, final, future, self._complete_when_written, group)
        return final

    def _background_group(self):
        """A gloo group of the manager's own for the manifest gather of async saves: it runs in a
        background thread, whose collectives must not interleave with the training step's."""
        if _world_size() == 1 or not dist.is_initialized():
            return None
        if self._group is None:
            self._group = dist.new_group(backend="gloo", timeout=_default_group_timeout())
        return self._group

    def poll(self) -> Path | None:
        """The async checkpoint that completed since the last call (rank 0; others: None).
        Collective while a write with a collective finalisation is in flight."""
        pending = self._pending
        if pending is None:
            return None
        if not (_everywhere(pending.done()) if pending.collective else pending.done()):
            return None
        self._pending = None
        self._settle(pending)
        return pending.final if _rank() == 0 else None

    def wait(self) -> Path | None:
        """Block until the async checkpoint in flight (if any) is complete on this rank."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        self._settle(pending)
        return pending.final

    def _settle(self, pending: "_Pending") -> None:
        if not pending.collective:
            pending.result(self._raise_write_error)
            return
        pending.thread.join()
        if not _everywhere(pending.error is None):  # then no rank runs the collective finalisation
            self._raise_write_error(pending.error or OSError("another rank could not write or hash its files"),
                                    pending.step, pending.tmp)
        try:
            pending.future.finalize()
        except BaseException as err:  # megatron raises a write failure on every rank
            self._raise_write_error(err, pending.step, pending.tmp)
        self._complete_now(pending.step, pending.tmp, pending.final, known=pending.part)

    def _hash_when_written(self, pending: "_Pending") -> None:
        """Background thread for a write finalised collectively: wait for this rank's files, hash
        them; the coordinator's files come at ``finalize`` (rank 0 hashes those, small, then)."""
        pending.future.result()
        part = _own_part(pending.tmp, _rank(), None)
        if "error" in part:
            raise (OSError if part["write_error"] else RuntimeError)(part["error"])
        pending.part = part["files"]

    def _complete_now(self, step: int, tmp: Path, final: Path, known: dict | None = None) -> None:
        """After a synchronous save (every rank's files are on disk when the engine returns): the
        manifest, then rank 0 makes the step count; its outcome is broadcast so that every rank
        returns only once the step counts, or raises if it does not."""
        error = None
        try:
            self._assemble(step, tmp, final, group=None, known=known)
        except BaseException as err:
            error = err
        outcome = _broadcast_from_first(None if error is None else (_is_write_error(error), _cause(error)))
        if error is not None:
            self._raise_write_error(error, step, tmp)
        if outcome is not None:  # rank 0 failed; it raises its own error, the others this
            is_write, text = outcome
            self._raise_write_error(OSError(text) if is_write else RuntimeError(text), step, tmp)

    def _complete_when_written(self, pending: "_Pending") -> None:
        """The background thread of an async save, on every rank: wait for the engine's write
        (DCP's future completes only after every rank's files and its .metadata are on disk),
        then the manifest as for a synchronous save. Even a failed write joins the gather, so
        that rank 0 learns of it instead of waiting for a part that never comes."""
        write_error = None
        try:
            pending.future.result()
        except BaseException as err:
            write_error = err
        self._assemble(pending.step, pending.tmp, pending.final, pending.group, write_error)
        if write_error is not None:
            raise write_error

    def _assemble(self, step: int, tmp: Path, final: Path, group, write_error: BaseException | None = None,
                  known: dict | None = None) -> None:
        """Every rank hashes the files it wrote (but those in ``known``, hashed already); rank 0
        gathers the parts (names, sizes, hashes) and finalises. O(checkpoint size / world size)
        per rank."""
        parts = _gather_to_first(_own_part(tmp, _rank(), write_error, known), group)
        if _rank() == 0:
            self._finalize(step, tmp, final, _merged(parts))

    def _finalize(self, step: int, tmp: Path, final: Path, files: dict[str, dict[str, Any]]) -> None:
        """Rank 0: meta.json (with the manifest) last, then the rename that makes it count."""
        meta = {"step": step, "world_size": _world_size(), **self.metadata, "files": files}
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
            if isinstance(err, (KeyboardInterrupt, SystemExit, UserError)):
                raise  # a UserError says what to do itself (not "move it aside": the files are sound)
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
    """An async checkpoint in flight: the engine's write future and, on every rank, a thread that
    waits for it, hashes this rank's files and (rank 0) finalises the step (manifest, rename); for
    a write finalised collectively the thread only hashes, and ``_settle`` does the rest."""

    def __init__(self, step: int, tmp: Path, final: Path, future, complete, group=None):
        self.step, self.tmp, self.final, self.future, self.group = step, tmp, final, future, group
        self.collective = hasattr(future, "finalize")  # finalised on the main thread, all ranks
        self.part: dict[str, dict[str, Any]] | None = None  # this rank's hashed files (collective case)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(complete,), name=f"ckpt-{step}", daemon=True)
        self.thread.start()

    def _run(self, complete) -> None:
        try:
            complete(self)
        except BaseException as err:  # re-raised in the training thread by result()
            self.error = err

    def done(self) -> bool:
        return not self.thread.is_alive()

    def result(self, on_error) -> None:
        self.thread.join()
        if self.error is not None:
            on_error(self.error, self.step, self.tmp)


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


# Who wrote a file, read from its name: DCP and megatron's torch_dist writer name a rank's data
# files __{rank}_{n}.distcp (and __{rank}.metadata when ranks do not coordinate); the trainer
# state is trainer_rank{rank}.pt. Every other file (DCP's .metadata, megatron's metadata.json) is
# the coordinator's, rank 0: metadata, O(number of tensors), not O(bytes).
_WRITER = re.compile(r"__(\d+)(?:_\d+\.distcp|\.metadata)$|^trainer_rank(\d+)\.pt$")


def writer_of(name: str) -> int:
    """The rank that wrote the checkpoint file ``name`` (a path relative to the step directory)."""
    found = _WRITER.search(name.rsplit("/", 1)[-1])
    return int(found.group(1) or found.group(2)) if found else 0


def _listing(directory: Path) -> list[str]:
    return [str(p.relative_to(directory)) for p in sorted(directory.rglob("*")) if p.is_file()]


def manifest(directory: Path, rank: int | None = None, skip=()) -> dict[str, dict[str, Any]]:
    """Relative path -> size and sha256 of every file under ``directory`` or, with ``rank``, of
    the files that rank wrote (``writer_of``); ``skip``: names left out."""
    names = [n for n in _listing(directory) if (rank is None or writer_of(n) == rank) and n not in skip]
    return {n: {"size": (directory / n).stat().st_size, "sha256": _sha256(directory / n)} for n in names}


def _own_part(tmp: Path, rank: int, write_error: BaseException | None, known: dict | None = None) -> dict[str, Any]:
    """This rank's part of the manifest (``known``: entries hashed already), or what went wrong
    (sent on, so rank 0 never waits for a part that does not come)."""
    if write_error is not None:
        return {"rank": rank, "error": _cause(write_error), "write_error": _is_write_error(write_error)}
    try:
        known = known or {}
        return {"rank": rank, "files": {**known, **manifest(tmp, rank, skip=known)}}
    except Exception as err:  # an unreadable file of ours: the step must not count
        return {"rank": rank, "error": _cause(err), "write_error": _is_write_error(err)}


def _merged(parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rank 0: the manifest from every rank's part; a part that reports an error fails the step."""
    files: dict[str, dict[str, Any]] = {}
    for part in parts:
        if "error" in part:
            text = f"rank {part['rank']}: {part['error']}"
            raise OSError(text) if part["write_error"] else RuntimeError(text)
        files.update(part["files"])
    return dict(sorted(files.items()))


def shares(files: dict[str, dict[str, Any]], world: int) -> list[list[str]]:
    """The manifest's files split among ``world`` ranks for verification, balanced by bytes
    (largest first, each to the least-loaded rank; ties to the lower rank). Deterministic: every
    rank computes the same split from the same manifest."""
    out: list[list[str]] = [[] for _ in range(world)]
    loads = [(0, r) for r in range(world)]
    for name in sorted(files, key=lambda n: (-int(files[n]["size"]), n)):
        load, r = heapq.heappop(loads)
        out[r].append(name)
        heapq.heappush(loads, (load + int(files[name]["size"]), r))
    return out


def verify(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What does not match the checkpoint's manifest (empty: it verifies), among the files that
    are ``rank``'s share of ``world`` (by default: all of them). Checkpoints written before
    manifests existed have none and verify trivially."""
    try:
        expected = read_meta(path).get("files")
    except CheckpointError as err:
        return [str(err)]
    if expected is None:
        return []
    mine = set(shares(expected, world)[rank])
    issues = []
    for name, want in expected.items():
        if name not in mine:
            continue
        file = path / name
        if not file.is_file():
            issues.append(f"{file}: missing")
        elif file.stat().st_size != want["size"]:
            issues.append(f"{file}: {file.stat().st_size} bytes, expected {want['size']} (truncated?)")
        elif _sha256(file) != want["sha256"]:
            issues.append(f"{file}: checksum differs from the manifest")
    return issues


def _verify_together(path: Path) -> list[str]:
    """Every rank checks its share of ``path``; the findings of all ranks, on every rank."""
    found = _all_gather(verify(path, _rank(), _world_size()))
    return list(dict.fromkeys(issue for issues in found for issue in issues))  # meta.json's: once


# -- small object collectives (names, sizes and hashes; never checkpoint data) --------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_to_first(obj: Any, group=None) -> list[Any] | None:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out


def _all_gather(obj: Any) -> list[Any]:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _everywhere(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (one tiny all-reduce)."""
    if not _distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _broadcast_from_first(obj: Any) -> Any:
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _default_group_timeout():
    """The default group's timeout (``distributed.timeout_minutes``) for the manager's own group,
    which would otherwise get torch's 30-minute default."""
    group = dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):  # gloo answers for cpu, nccl for cuda
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint directory (step, world_size, engine, layout)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        int(meta["step"]), int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path / 'meta.json'}: unreadable checkpoint metadata ({err})") from err
    return meta

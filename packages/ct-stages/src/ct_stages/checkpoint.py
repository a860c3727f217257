"""Resumable checkpoints, written atomically: a killed run never leaves one that looks complete.

Layout: ``<root>/step_00000042/`` holding ``engine/`` (model + optimizer, written by the engine:
torch.distributed.checkpoint for native engines, megatron dist_checkpointing for megatron),
``trainer_rank{r}.pt`` (scheduler, data-loader state, RNG states, step, consumed tokens: one per
rank because loader and RNG state are per rank) and ``meta.json``. Everything is written under
``.tmp-step_00000042`` and renamed at the end; only names matching ``step_*`` count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("ct_stages")
STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is not initialised: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, keep_last: int = 2):
        if keep_last < 1:
            raise ValueError(f"trainer.keep_last_checkpoints must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, engine, trainer_state: dict[str, Any]) -> Path:
        """Collective: every rank calls it with its own trainer_state."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp-step_{step:08d}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a killed save
            tmp.mkdir()
        _barrier()
        with _quiet_single_process():
            engine.save_checkpoint(str(tmp / "engine"))
        torch.save(trainer_state, tmp / f"trainer_rank{_rank()}.pt")
        _barrier()
        if _rank() == 0:
            meta = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
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
        meta = json.loads((path / "meta.json").read_text())
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank_file = path / f"trainer_rank{_rank()}.pt"
        if meta["world_size"] != world or not rank_file.is_file():
            raise RuntimeError(
                f"{path}: written by {meta['world_size']} processes, resuming with {world}; exact resume "
                "needs the same layout (load the weights into a new run with init_from instead)"
            )
        with _quiet_single_process():
            engine.load_checkpoint(str(path / "engine"))
        return torch.load(rank_file, weights_only=False)

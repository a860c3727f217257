"""A rich progress bar with ETA on a terminal; silent (the trainer logs lines instead) elsewhere."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, completed: int, *, enabled: bool, title: str):
        self.interactive = enabled and sys.stderr.isatty()
        self._bar = None
        if self.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"), transient=False)
            self._task = self._bar.add_task(title, total=total, completed=completed, stats="")

    def __enter__(self) -> "Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, record: dict) -> None:
        if self._bar is not None:
            mfu = "n/a" if record["mfu"] is None else f"{record['mfu']:.1%}"
            stats = f"loss {record['loss']:.3f}  {record['tokens_per_s_per_device']:,.0f} tok/s/dev  mfu {mfu}"
            self._bar.update(self._task, completed=step, stats=stats)

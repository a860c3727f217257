"""A dependency-free progress line on stderr (a bar on a terminal, a few lines elsewhere)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.done, self.start, self._last = 0, time.perf_counter(), -1.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        final = self.done >= self.total
        if not final and now - self._last < (0.2 if self.tty else 10.0):
            return
        self._last = now
        rate = self.done / max(now - self.start, 1e-9)
        width = 30
        fill = int(width * min(self.done / self.total, 1.0))
        line = f"{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} {rate:.1f} samples/s"
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()

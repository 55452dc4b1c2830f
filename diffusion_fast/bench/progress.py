"""A one-line progress display on stderr, silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``[ 3/40  12s] label`` rewritten in place; ``enabled=None`` means "when stderr is a TTY"."""

    def __init__(self, total: int, *, enabled: bool | None = None, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = total
        self.count = 0
        self.t0 = time.perf_counter()
        self._width = 0

    def step(self, label: str) -> None:
        """Announce the item about to run."""
        self.count += 1
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        total = max(self.total, self.count)
        line = f"[{self.count:>{len(str(total))}}/{total} {elapsed:5.0f}s] {label}"
        pad = max(0, self._width - len(line))
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()
        self._width = len(line)

    def add(self, n: int) -> None:
        """Grow the total (items discovered while running)."""
        self.total += n

    def close(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

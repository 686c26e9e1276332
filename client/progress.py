"""A minimal progress line on stderr: `esm2 encode` needs no progress-bar library."""

from __future__ import annotations

import sys
import time


class Progress:
    """`done/total unit (rate/s)` rewritten in place; silent unless enabled.

    `enabled=None` means: only when stderr is a terminal."""

    def __init__(self, total: int, unit: str = "seq", enabled: bool | None = None, stream=None):
        self.total, self.unit, self.done = total, unit, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = time.monotonic()

    def __enter__(self) -> Progress:
        self._draw()
        return self

    def update(self, count: int) -> None:
        self.done += count
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        self.stream.write(f"\r{self.done}/{self.total} {self.unit} ({rate:,.1f} {self.unit}/s)")
        self.stream.flush()

    def __exit__(self, *exc_info) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

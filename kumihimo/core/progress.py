"""Progress lines for long stages: one line per update, throttled, on stderr.

Plain lines (no carriage-return tricks) so Slurm logs and CI output stay readable.
"""

from __future__ import annotations

import sys
import time


def say(message: str) -> None:
    """One status line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """Count work items and print `[stage] done/total unit (rate/s)` at most every `interval` s."""

    def __init__(self, stage: str, total: int | None = None, unit: str = "items", interval: float = 5.0):
        self.stage, self.total, self.unit, self.interval = stage, total, unit, interval
        self.count = 0
        self.start = self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        of_total = f"/{self.total}" if self.total is not None else ""
        say(f"[{self.stage}] {self.count}{of_total} {self.unit} ({self.count / elapsed:,.1f}/s)")

    def close(self) -> None:
        self._print(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()

"""`Progress`: throttled counts of long stages, printed through the stage's logger (kumihimo.core.logs)."""

from __future__ import annotations

import time

from kumihimo.core.logs import stage_logger


class Progress:
    """Count work items and log `done/total unit (rate/s)` to kumihimo.<stage> at most every `interval` s."""

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
        stage_logger(self.stage).info(f"{self.count}{of_total} {self.unit} ({self.count / elapsed:,.1f}/s)")

    def close(self) -> None:
        self._print(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()

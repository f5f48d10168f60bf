"""Status lines on stderr: `say` for one line, `Progress` for throttled counts of long stages, and the
`kumihimo` logger hierarchy (`log_to_stderr`) for processes of which only rank 0 should speak.

Plain lines (no carriage-return tricks, no timestamps or level names) so Slurm logs and CI output stay
readable.
"""

from __future__ import annotations

import logging
import sys
import time

LOGGER = "kumihimo"
"""Root of the loggers of the stages, e.g. `logging.getLogger("kumihimo.train")`."""


def say(message: str) -> None:
    """One status line on stderr, flushed at once."""
    print(message, file=sys.stderr, flush=True)


class _SayHandler(logging.Handler):
    """Each record as one `say` line: the message alone, on the sys.stderr of the moment it is written
    (so redirections and pytest's capture see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(self.format(record))
        except Exception:
            self.handleError(record)


class RankFilter(logging.Filter):
    """Pass every record on rank 0; on other ranks only those logged with `extra={"all_ranks": True}`,
    so N processes do not print every line N times."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or getattr(record, "all_ranks", False)


def log_to_stderr(rank: int = 0) -> logging.Logger:
    """Send INFO and above of the `kumihimo` loggers to stderr as plain lines, from `rank` 0 only (see
    RankFilter). Idempotent: a second call only updates the rank. The records do not propagate to the
    root logger, so a library that configures it (logging.basicConfig) does not print them twice."""
    logger = logging.getLogger(LOGGER)
    handler = next((h for h in logger.handlers if isinstance(h, _SayHandler)), None)
    if handler is None:
        handler = _SayHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.filters = [RankFilter(rank)]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


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

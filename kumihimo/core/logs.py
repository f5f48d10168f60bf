"""The one console channel of kumihimo: Python logging, one logger per stage, one handler.

Every stage logs to `stage_logger("<stage>")`, the logger `kumihimo.<stage>` (kumihimo.data_prep,
kumihimo.tokenizer, kumihimo.tokenizer.merge, kumihimo.train, kumihimo.convert, kumihimo.eval...), and
never types its stage into a message: the one handler, on the `kumihimo` logger and set up here only,
prints each record as a plain line on stderr as `[<stage>] <message>`, the stage taken from the logger's
name (dots after `kumihimo.` become spaces). The `kumihimo` logger itself (`stage_logger(None)`) prints
lines with no prefix: tables, the per-step metrics line, the quickstart's stage counter.

Plain lines (no carriage-return tricks, no timestamps or level names) so Slurm logs and CI output stay
readable. In a multi-process job only rank 0 speaks (RankFilter): the rank is the launcher's RANK
variable until `log_to_stderr(rank)` sets it.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "kumihimo"
"""Root of the loggers of the stages; its handler is the only one kumihimo installs."""


def stage_of(logger_name: str) -> str:
    """The stage a logger speaks for, as its lines show it: "kumihimo.tokenizer.merge" -> "tokenizer merge";
    "" for the `kumihimo` logger itself and for loggers outside it."""
    if not logger_name.startswith(ROOT + "."):
        return ""
    return logger_name[len(ROOT) + 1 :].replace(".", " ")


class StageFormatter(logging.Formatter):
    """`[<stage>] <message>`, the stage from the record's logger name; the message alone without one."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        stage = stage_of(record.name)
        return f"[{stage}] {message}" if stage else message


class _StderrLineHandler(logging.Handler):
    """Each record as one line on the sys.stderr of the moment it is written (so redirections and
    pytest's capture see it), flushed at once."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
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


def _launcher_rank() -> int:
    """The global rank torchrun/srun give this process (RANK), 0 outside a launcher."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def log_to_stderr(rank: int | None = None) -> logging.Logger:
    """Send INFO and above of the `kumihimo` loggers to stderr as plain lines, from rank 0 only (see
    RankFilter; `rank` None keeps the rank set before, at first the launcher's). Idempotent. The records
    do not propagate to the root logger, so a library that configures it (logging.basicConfig) does not
    print them twice."""
    logger = logging.getLogger(ROOT)
    handler = next((h for h in logger.handlers if isinstance(h, _StderrLineHandler)), None)
    if handler is None:
        handler = _StderrLineHandler()
        handler.setFormatter(StageFormatter("%(message)s"))
        handler.filters = [RankFilter(_launcher_rank())]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if rank is not None:
        handler.filters = [RankFilter(rank)]
    return logger


def stage_logger(stage: str | None) -> logging.Logger:
    """The logger of `stage` (`kumihimo.<stage>`; None: `kumihimo`, lines with no prefix), with the
    channel set up."""
    log_to_stderr()
    return logging.getLogger(f"{ROOT}.{stage}" if stage else ROOT)

"""Faults on purpose, for the tests of the watchdog and the straggler report; nothing happens unless
the environment variable KUMIHIMO_FAULT is set.

KUMIHIMO_FAULT=KIND:RANK:STEP[:SECONDS] makes rank RANK, at training step STEP:

* `stop`: send itself SIGSTOP at the start of the step (a frozen process),
* `collective`: sleep SECONDS (default 600) on its way into the step's loss all-reduce, which the
  other ranks are already waiting in,
* `save`: sleep SECONDS (default 600) inside the checkpoint save,
* `slow`: from STEP on, sleep SECONDS (default 0.2) for every micro-batch it loads (a slow node).

A requeued Slurm job (SLURM_RESTART_COUNT > 0) has no fault, so that it can resume past STEP.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import cache

FAULT_ENV = "KUMIHIMO_FAULT"
KINDS = ("stop", "collective", "save", "slow")


@cache
def _fault() -> tuple[str, int, int, float] | None:
    spec = os.environ.get(FAULT_ENV)
    if not spec or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
        return None
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in KINDS:
        raise ValueError(f"{FAULT_ENV}={spec!r} is not KIND:RANK:STEP[:SECONDS] with KIND one of {KINDS}")
    seconds = float(parts[3]) if len(parts) == 4 else (0.2 if parts[0] == "slow" else 600.0)
    return parts[0], int(parts[1]), int(parts[2]), seconds


def slowed(batches: Iterator, rank: int, step: int) -> Iterator:
    """`batches`, each loaded SECONDS later when a `slow` fault applies to this rank and step."""
    for batch in batches:
        inject("slow", rank, step)
        yield batch


def inject(kind: str, rank: int, step: int) -> None:
    """Do the configured fault if it is of `kind`, for this rank and step."""
    fault = _fault()
    if fault is None or fault[0] != kind or fault[1] != rank:
        return
    if kind == "slow" and step >= fault[2]:
        time.sleep(fault[3])
    elif step == fault[2] and kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif step == fault[2]:
        time.sleep(fault[3])

"""Stop on time without waiting for a signal: save and exit for requeue before the job's end.

The end is the earliest of `schedule.exit_after_minutes` after the trainer started and, with
`schedule.exit_at_job_end`, the batch job's own end: SLURM_JOB_END_TIME, else
`squeue -h -j $SLURM_JOB_ID -o %e`; under PBS, `qstat -f $PBS_JOBID`'s start time plus its walltime.
Rank 0 judges at every step boundary whether one more step, a save (the longest measured, kept in the
checkpoint so that a chained job knows it from its first step) and `schedule.exit_margin_minutes` still
fit before the end; the stop flag is combined across ranks in the same all-reduce as the stop signals
(signals.StopRequest.agree), so every rank stops at the same step.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable, Mapping
from datetime import datetime

Run = Callable[[list[str]], str]


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def slurm_end_time(env: Mapping[str, str], run: Run = _run) -> float | None:
    """The Slurm job's end (epoch seconds), or None outside Slurm or without a time limit."""
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    text = run(["squeue", "-h", "-j", job, "-o", "%e"]).strip()
    try:  # %e is local time, e.g. 2026-12-06T08:45:00; Unknown/NONE without a limit
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def pbs_end_time(env: Mapping[str, str], run: Run = _run) -> float | None:
    """The PBS job's end: its start time (stime) plus Resource_List.walltime, from `qstat -f`."""
    job = env.get("PBS_JOBID")
    if not job:
        return None
    text = run(["qstat", "-f", job])
    walltime = re.search(r"Resource_List\.walltime = (\d+):(\d\d):(\d\d)", text)
    started = re.search(r"\bstime = (.+)", text)
    if not walltime or not started:
        return None
    try:  # e.g. "Sun Dec  6 07:00:00 2026", local time
        start = datetime.strptime(" ".join(started.group(1).split()), "%a %b %d %H:%M:%S %Y").timestamp()
    except ValueError:
        return None
    hours, minutes, seconds = (int(g) for g in walltime.groups())
    return start + hours * 3600 + minutes * 60 + seconds


class Deadline:
    """When to stop; `due()` at a step boundary says whether the next step and a save still fit."""

    def __init__(self, end: float | None, source: str, margin_s: float, save_s: float = 0.0):
        self.end, self.source, self.margin_s = end, source, margin_s
        self.longest_step = 0.0
        self.longest_save = save_s

    @classmethod
    def from_schedule(
        cls,
        exit_after_minutes: float | None,
        exit_at_job_end: bool,
        margin_minutes: float,
        started: float,
        env: Mapping[str, str] = os.environ,
        run: Run = _run,
    ) -> Deadline:
        """The earliest end that applies (`started`: time.time() when the trainer started)."""
        ends = []
        if exit_after_minutes is not None:
            ends.append(
                (started + 60 * exit_after_minutes, f"schedule.exit_after_minutes={exit_after_minutes:g}")
            )
        if exit_at_job_end:
            slurm = slurm_end_time(env, run)
            if slurm is not None:
                ends.append((slurm, f"the end of Slurm job {env.get('SLURM_JOB_ID', '?')}"))
            pbs = pbs_end_time(env, run)
            if pbs is not None:
                ends.append((pbs, f"the end of PBS job {env.get('PBS_JOBID')}"))
        if not ends:
            return cls(None, "", 60 * margin_minutes)
        end, source = min(ends)
        return cls(end, source, 60 * margin_minutes)

    def note_step(self, seconds: float) -> None:
        self.longest_step = max(self.longest_step, seconds)

    def note_save(self, seconds: float) -> None:
        self.longest_save = max(self.longest_save, seconds)

    def needed(self) -> float:
        """Seconds to keep free before the end: the next step, a save, the margin."""
        return self.longest_step + self.longest_save + self.margin_s

    def due(self, now: float | None = None) -> bool:
        return self.end is not None and (now or time.time()) + self.needed() >= self.end

    def describe(self) -> str:
        end = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.end))
        return (
            f"{end} ({self.source}); keeping free one step ({self.longest_step:.1f} s), a save "
            f"({self.longest_save:.1f} s) and the margin ({self.margin_s:.0f} s)"
        )

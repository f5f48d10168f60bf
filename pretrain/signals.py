"""Stop cleanly when the scheduler says time is up, and guard against bad losses.

Slurm sends SIGUSR1 (`#SBATCH --signal=USR1@600`) or SIGTERM before a job's time limit. Ranks can
receive it at different steps, so the flag is combined across all ranks (one tiny all-reduce per step)
and every rank stops at the same step boundary: the trainer saves a checkpoint and exits with
`EXIT_REQUEUE`, which the batch scripts turn into `scontrol requeue`. The next allocation resumes from
that checkpoint.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXIT_REQUEUE = 3
"""Exit code of a run that saved and stopped because it was signalled; the Slurm scripts requeue it."""
EXIT_BAD_LOSS = 4
"""Exit code of a run stopped by the loss guard (NaN/Inf or spike with policy `stop`)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Record stop signals; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LossVerdict:
    ok: bool
    reason: str = ""


class LossGuard:
    """Flag non-finite losses and spikes above `spike_factor` x the running mean of recent good losses."""

    def __init__(self, spike_factor: float | None, warmup_steps: int, ema: float = 0.9):
        self.spike_factor = spike_factor
        self.warmup_steps = warmup_steps
        self.ema = ema
        self.mean: float | None = None
        self.num_good = 0

    def check(self, loss: float) -> LossVerdict:
        if not math.isfinite(loss):
            return LossVerdict(False, f"loss is {loss}")
        if (
            self.spike_factor is not None
            and self.mean is not None
            and self.num_good >= self.warmup_steps
            and loss > self.spike_factor * self.mean
        ):
            return LossVerdict(
                False, f"loss {loss:.4f} is over {self.spike_factor} x the running mean {self.mean:.4f}"
            )
        self.mean = loss if self.mean is None else self.ema * self.mean + (1 - self.ema) * loss
        self.num_good += 1
        return LossVerdict(True)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "num_good": self.num_good}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.num_good = state.get("mean"), state.get("num_good", 0)

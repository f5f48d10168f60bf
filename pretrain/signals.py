"""Stop cleanly when the scheduler says time is up, and guard against bad losses.

Slurm sends SIGUSR1 (`#SBATCH --signal=USR1@600`) or SIGTERM before a job's time limit. Ranks can
receive it at different steps, so the flag is combined across all ranks (one tiny all-reduce per step)
and every rank stops at the same step boundary: the trainer saves a checkpoint and exits with
`EXIT_REQUEUE`, which the batch scripts turn into `scontrol requeue`. The next allocation resumes from
that checkpoint.

Before the first step there is nothing to save, so SIGTERM then ends the process at once (whatever it
is doing: building dataset indices, loading a checkpoint) with `EXIT_REQUEUE`; SIGUSR1, the early
warning, is still kept for the first step boundary. Python runs signal handlers only between bytecodes,
so a long C call (Megatron's index helpers) would delay them: a watcher thread, woken through
`signal.set_wakeup_fd`, ends the process itself if SIGTERM or SIGINT is not handled within
`SETUP_GRACE_SECONDS`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

EXIT_REQUEUE = 3
"""Exit code of a run that saved and stopped because it was signalled; the Slurm scripts requeue it."""
EXIT_BAD_LOSS = 4
"""Exit code of a run stopped by the loss guard (NaN/Inf or spike with policy `stop`)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
SETUP_GRACE_SECONDS = 10.0
"""How long a stop signal before the first step may wait for the main thread before the watcher exits."""


class StoppedBeforeTraining(BaseException):
    """SIGTERM before the first training step. A BaseException, like KeyboardInterrupt, so that no
    library's `except Exception` around a long build swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signal_name = signal.Signals(signum).name


class StopRequest:
    """Record stop signals; `agreed()` tells every rank whether any rank got one."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.training = False
        """Set when the first step starts; before it SIGTERM raises StoppedBeforeTraining."""
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._closed = False
        self._wakeup_read, self._wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_write, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup_write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch_setup, name="kumihimo-stop-watcher", daemon=True).start()

    def _watch_setup(self) -> None:
        """Exit after SETUP_GRACE_SECONDS if a SIGTERM/SIGINT before the first step is not handled."""
        try:
            self._watch_until_closed()
        finally:
            os.close(self._wakeup_read)

    def _watch_until_closed(self) -> None:
        while True:
            try:
                received = os.read(self._wakeup_read, 64)
            except OSError:
                return
            if self._closed or not received:
                return
            stops = [s for s in received if s in (signal.SIGTERM, signal.SIGINT)]
            if not stops or self.training:
                continue
            deadline = time.monotonic() + SETUP_GRACE_SECONDS
            while time.monotonic() < deadline and not self._closed:
                time.sleep(0.1)
            if self._closed or self.training:
                return
            name = signal.Signals(stops[0]).name
            sys.stderr.write(
                f"[train] {name} before the first step: exiting (nothing trained, nothing to save)\n"
            )
            sys.stderr.flush()
            os._exit(EXIT_REQUEUE if stops[0] == signal.SIGTERM else 128 + signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if not self.training and signum == signal.SIGTERM:
            raise StoppedBeforeTraining(signum)

    def agreed(self, device: torch.device) -> bool:
        return self.agree(device) is not None

    def agree(self, device: torch.device, deadline_due: bool = False) -> str | None:
        """Whether any rank got a stop signal ("signal") or judged the deadline near ("deadline",
        deadline.Deadline); None to go on. One all-reduce of two flags."""
        flags = torch.tensor(
            [1.0 if self.received is not None else 0.0, 1.0 if deadline_due else 0.0], device=device
        )
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item() > 0:
            return "signal"
        return "deadline" if flags[1].item() > 0 else None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if not self._closed:
            self._closed = True
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            os.close(self._wakeup_write)  # wakes the watcher, which then returns


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

"""Stragglers: name the ranks that are slower than the others.

In synchronous training every rank's step takes as long as the slowest rank's, so the step time says
nothing about who is slow. Each rank measures instead its own work before the first gradient
collective (`compute_s`: loading the step's micro-batches, forward and backward, from the start of the
step until Megatron's finalize_model_grads begins) and, within it, its data loading (`data_s`). Every
`resilience.straggler_interval` steps one all_gather of these two means (a few floats per rank) lets
every rank compare them with the median; a rank whose compute time is over
`resilience.straggler_factor` x the median is named in the log and the metrics with its host and ratio,
as nvidia-resiliency-ext's straggler report does. With pipeline parallelism the pipeline waits fall in
compute_s too (and tensor-parallel waits), so compare ranks of the same stage.

On a GPU the work is timed with CUDA events (DeviceClock), which wait for nothing: the timing adds no
torch.cuda.synchronize to any step, and the events are read only at report steps (as
metrics.StepTimer synchronizes only for reported steps). Data loading is host work, timed on the host.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from kumihimo.core.logs import stage_logger
from kumihimo.pretrain.watchdog import host_name

log = stage_logger("stragglers")


class HostClock:
    """Times on the host: on CPU a step's work is done when its calls return."""

    def mark(self) -> float:
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        return end - start


class DeviceClock:
    """Times on the GPU's current stream with CUDA events: recording one does not wait for the GPU
    (a host clock would time only the kernel launches, and a torch.cuda.synchronize per step would
    stall them, metrics.StepTimer). An event is read only at a report step, when the step's loss
    (read on the host after the gradient collective) has already waited past it."""

    def __init__(self, event=None):
        self.event = event or torch.cuda.Event

    def mark(self):
        event = self.event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        end.synchronize()  # done already (see above): reads the time, does not stall a step
        return start.elapsed_time(end) / 1000


class StragglerDetector:
    def __init__(self, interval: int, factor: float, device: torch.device | None, is_logger: bool):
        self.interval, self.factor, self.device, self.is_logger = interval, factor, device, is_logger
        self.hosts: list[str] = [host_name()]
        if interval and dist.is_initialized():
            self.hosts = [""] * dist.get_world_size()
            dist.all_gather_object(self.hosts, host_name())
        self.active = bool(interval) and len(self.hosts) > 1
        """Whether steps are timed: one rank has nobody to be compared with."""
        self.clock = DeviceClock() if device is not None and device.type == "cuda" else HostClock()
        self._step_start = None
        self._reached_sync = None
        self._data_s = 0.0
        self._steps: list[tuple] = []
        """(start mark, gradient-collective mark, data seconds) of each step since the last report."""

    # ---------------------------------------------------------------- per step, on every rank
    def start_step(self) -> None:
        if self.active:
            self._step_start, self._reached_sync, self._data_s = self.clock.mark(), None, 0.0

    def timed(self, batches: Iterator) -> Iterator:
        """`batches`, adding the time each takes to load (host work) to this step's data time."""
        while True:
            started = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._data_s += time.perf_counter() - started
            yield batch

    def wrap_finalize(self, finalize):
        """Megatron's finalize_model_grads, noting when this rank reaches the gradient collective."""

        def finalize_noting_arrival(*args, **kwargs):
            if self.active and self._reached_sync is None:
                self._reached_sync = self.clock.mark()
            return finalize(*args, **kwargs)

        return finalize_noting_arrival

    def end_step(self) -> None:
        if not self.active:
            return
        end = self._reached_sync if self._reached_sync is not None else self.clock.mark()
        self._steps.append((self._step_start, end, self._data_s))

    # ---------------------------------------------------------------- every interval steps
    def local_means(self) -> tuple[float, float]:
        """This rank's mean work and data seconds per step since the last report (and a fresh start)."""
        steps, self._steps = self._steps, []
        work = sum(self.clock.seconds(start, end) for start, end, _ in steps)
        return work / len(steps), sum(data for _, _, data in steps) / len(steps)

    def report(self, step: int) -> dict:
        """Every `interval` steps (call on every rank): gather, compare, log; the metrics to record."""
        if not self.active or step % self.interval or not self._steps:
            return {}
        local = torch.tensor(self.local_means(), dtype=torch.float64, device=self.device)
        rows = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(rows, local)
        compute = [float(r[0]) for r in rows]
        data = [float(r[1]) for r in rows]
        return self._judge(step, compute, data)

    def _judge(self, step: int, compute: list[float], data: list[float]) -> dict:
        median = statistics.median(compute)
        ratios = [c / median if median > 0 else 1.0 for c in compute]
        slowest = max(range(len(compute)), key=lambda r: ratios[r])
        stragglers = [
            {
                "rank": r,
                "host": self.hosts[r],
                "ratio": round(ratios[r], 3),
                "compute_s": compute[r],
                "data_s": data[r],
            }
            for r in range(len(compute))
            if ratios[r] > self.factor
        ]
        if self.is_logger:
            for row in stragglers:
                log.info(
                    f"step {step}: rank {row['rank']} on {row['host']} is {row['ratio']:.2f} x the "
                    f"median: {row['compute_s']:.3f} s of work per step against {median:.3f} s (data loading "
                    f"{row['data_s']:.3f} s against a median {statistics.median(data):.3f} s)"
                )
        return {
            "straggler_max_ratio": ratios[slowest],
            "straggler_slowest_rank": slowest,
            "stragglers": stragglers,
        }

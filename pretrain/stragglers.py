"""Stragglers: name the ranks that are slower than the others.

In synchronous training every rank's step takes as long as the slowest rank's, so the step time says
nothing about who is slow. Each rank measures instead its own work before the first gradient
collective (`compute_s`: loading the step's micro-batches, forward and backward, from the start of the
step until Megatron's finalize_model_grads begins) and, within it, its data loading (`data_s`). Every
`resilience.straggler_interval` steps one all_gather of these two means (a few floats per rank) lets
every rank compare them with the median; a rank whose compute time is over
`resilience.straggler_factor` x the median is named in the log and the metrics with its host and ratio,
as nvidia-resiliency-ext's straggler report does. With pipeline parallelism the pipeline waits fall in
compute_s too, so compare ranks of the same stage.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from kumihimo.pretrain.watchdog import host_name

log = logging.getLogger("kumihimo.train")


class StragglerDetector:
    def __init__(self, interval: int, factor: float, device: torch.device, is_logger: bool):
        self.interval, self.factor, self.device, self.is_logger = interval, factor, device, is_logger
        self.hosts: list[str] = [host_name()]
        if interval and dist.is_initialized():
            self.hosts = [""] * dist.get_world_size()
            dist.all_gather_object(self.hosts, host_name())
        self._step_start = 0.0
        self._reached_sync: float | None = None
        self._data_s = 0.0
        self._sums = [0.0, 0.0]
        self._count = 0

    # ---------------------------------------------------------------- per step, on every rank
    def start_step(self) -> None:
        self._step_start, self._reached_sync, self._data_s = time.perf_counter(), None, 0.0

    def timed(self, batches: Iterator) -> Iterator:
        """`batches`, adding the time each takes to load to this step's data time."""
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
            if self._reached_sync is None:
                self._reached_sync = time.perf_counter()
            return finalize(*args, **kwargs)

        return finalize_noting_arrival

    def end_step(self) -> None:
        end = self._reached_sync if self._reached_sync is not None else time.perf_counter()
        self._sums[0] += end - self._step_start
        self._sums[1] += self._data_s
        self._count += 1

    # ---------------------------------------------------------------- every interval steps
    def report(self, step: int) -> dict:
        """Every `interval` steps (call on every rank): gather, compare, log; the metrics to record."""
        if not self.interval or step % self.interval or not self._count or len(self.hosts) < 2:
            return {}  # one rank has nobody to be compared with
        local = torch.tensor([s / self._count for s in self._sums], dtype=torch.float64, device=self.device)
        self._sums, self._count = [0.0, 0.0], 0
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
                    f"[stragglers] step {step}: rank {row['rank']} on {row['host']} is {row['ratio']:.2f} x the "
                    f"median: {row['compute_s']:.3f} s of work per step against {median:.3f} s (data loading "
                    f"{row['data_s']:.3f} s against a median {statistics.median(data):.3f} s)"
                )
        return {
            "straggler_max_ratio": ratios[slowest],
            "straggler_slowest_rank": slowest,
            "stragglers": stragglers,
        }

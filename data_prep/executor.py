"""Local process pools for data_prep: spawned workers, loud failure, cancellation on error.

concurrent.futures rather than multiprocessing.Pool: when a worker dies (killed, or cannot even
start) the pool reports BrokenProcessPool instead of replacing the worker forever and hanging.
Workers die with the parent (a `kill -9` of the run must not leave them writing into its output).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from kumihimo.core.processes import die_with_parent


@contextmanager
def process_pool(
    num_workers: int, initializer: Callable[..., None], initargs: tuple
) -> Iterator[ProcessPoolExecutor]:
    # spawn: workers must not inherit locks or threads of the parent (sentencepiece, numpy)
    pool = ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _start_worker(parent_pid: int, initializer: Callable[..., None], initargs: tuple) -> None:
    die_with_parent(parent_pid)
    initializer(*initargs)


def run_unordered(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> Iterator[Any]:
    """Results as they finish; the first failure is raised at once."""
    futures = [pool.submit(fn, task) for task in tasks]
    for future in as_completed(futures):
        yield future.result()


def run_ordered(
    pool: ProcessPoolExecutor, fn: Callable[[Any], Any], tasks: Iterable[Any], window: int
) -> Iterator[Any]:
    """Results in task order, with at most `window` tasks in flight (bounded memory)."""
    in_flight: list[Future] = []
    for task in tasks:
        in_flight.append(pool.submit(fn, task))
        if len(in_flight) >= window:
            yield in_flight.pop(0).result()
    for future in in_flight:
        yield future.result()

"""Local process pools for data_prep: spawned workers, loud failure, cancellation on error.

concurrent.futures rather than multiprocessing.Pool: when a worker dies (killed, or cannot even
start) the pool reports BrokenProcessPool instead of replacing the worker forever and hanging.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any


@contextmanager
def process_pool(
    num_workers: int, initializer: Callable[..., None], initargs: tuple
) -> Iterator[ProcessPoolExecutor]:
    # spawn: workers must not inherit locks or threads of the parent (sentencepiece, numpy)
    pool = ProcessPoolExecutor(
        num_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=initializer,
        initargs=initargs,
    )
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


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

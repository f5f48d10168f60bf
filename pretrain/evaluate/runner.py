"""Run a list of tasks against one backend, within a time budget, and record the results."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from kumihimo.core.files import write_text_atomic
from kumihimo.pretrain.evaluate.scoring import Backend, Codec, TaskResult, score_task
from kumihimo.pretrain.evaluate.tasks import Task


def run_tasks(
    tasks: list[Task],
    backend: Backend,
    codec: Codec,
    batch_size: int = 8,
    should_stop: Callable[[], bool] = lambda: False,
    max_seconds: float | None = None,
) -> list[TaskResult]:
    """Score every task; between batches stop when should_stop() (e.g. a requeue signal, agreed by all
    ranks) or the time budget runs out. Unfinished tasks come back with complete=False and no metrics."""
    started = time.monotonic()
    stopped = False

    def stop_now() -> bool:
        nonlocal stopped
        if not stopped:
            over = max_seconds is not None and time.monotonic() - started > max_seconds
            stopped = should_stop() or over
        return stopped

    return [score_task(task, backend, codec, batch_size, stop_now) for task in tasks]


def flat_metrics(results: list[TaskResult]) -> dict[str, float]:
    """{'tasks/<name>/<metric>': value} of the finished tasks, for the metrics sink."""
    out = {}
    for result in results:
        if result.complete:
            for key, value in result.metrics.items():
                if key != "num_examples":
                    out[f"tasks/{result.name}/{key}"] = value
    return out


def write_results(results: list[TaskResult], folder: Path, info: dict | None = None) -> Path:
    """results.json (metrics per task) and samples_<task>.jsonl (per-document scores) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        **(info or {}),
        "tasks": {
            r.name: {"complete": r.complete, "seconds": round(r.seconds, 3), **r.metrics} for r in results
        },
    }
    for result in results:
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result.samples)
        write_text_atomic(folder / f"samples_{result.name}.jsonl", lines)
    path = folder / "results.json"
    write_text_atomic(path, json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    return path


def describe(results: list[TaskResult]) -> str:
    parts = []
    for r in results:
        if not r.complete:
            parts.append(f"{r.name}: stopped")
        else:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items() if k != "num_examples")
            parts.append(f"{r.name}: {shown} (n={r.metrics['num_examples']}, {r.seconds:.1f} s)")
    return "; ".join(parts)

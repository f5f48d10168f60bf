"""Downstream tasks inside the training loop, on the model as it is laid out (no conversion).

The trainer builds one `InLoopEvaluation` in setup (task files are read and checked there, before the
first step) and calls `run(step)` at each evaluation interval on every rank. Between batches it asks
the trainer's stop request (an all-reduce, so every rank agrees) and the time budget: a Slurm warning
signal ends the evaluation at once, unfinished tasks are reported as stopped, and the loop goes on to
save for requeue. Results go to <output_dir>/eval/iter_NNNNNNN/ and into the metrics as
tasks/<task>/<metric>.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from kumihimo.pretrain.evaluate.megatron_backend import MegatronBackend, SPMCodec
from kumihimo.pretrain.evaluate.runner import describe, flat_metrics, run_tasks, write_results
from kumihimo.pretrain.evaluate.tasks import Task, load_tasks

log = logging.getLogger("kumihimo.train")


def expand_task_paths(entries: list[str]) -> list[Path]:
    """Task YAML files, with folders standing for the YAML files in them."""
    from kumihimo.pretrain.evaluate.cli import task_files

    return task_files(entries)


class InLoopEvaluation:
    def __init__(
        self,
        task_paths: list[str],
        batch_size: int,
        max_seconds: float | None,
        model_chunks: list,
        tokenizer,
        seq_length: int,
        device: torch.device,
        output_dir: Path,
        is_logger: bool,
    ):
        self.tasks: list[Task] = load_tasks(expand_task_paths(task_paths))
        self.batch_size = batch_size
        self.max_seconds = max_seconds
        self.model = model_chunks
        self.backend = MegatronBackend(model_chunks, tokenizer.vocab_size, seq_length, device)
        self.codec = SPMCodec(tokenizer)
        self.output_dir = output_dir
        self.is_logger = is_logger

    def run(self, step: int, should_stop: Callable[[], bool]) -> dict[str, float]:
        for chunk in self.model:
            chunk.eval()
        try:
            results = run_tasks(
                self.tasks, self.backend, self.codec, self.batch_size, should_stop, self.max_seconds
            )
        finally:
            for chunk in self.model:
                chunk.train()
        if self.is_logger:
            write_results(results, self.output_dir / "eval" / f"iter_{step:07d}", {"iteration": step})
            log.info(f"[eval] step {step}: {describe(results)}")
        return flat_metrics(results)

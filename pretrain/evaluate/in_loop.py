"""Evaluation inside the training loop: per-source validation and downstream tasks.

The trainer builds one `InLoopEvaluation` in setup (task files are read and checked there, before the
first step) and calls `run(step)` at each evaluation interval on every rank. Before every batch all
ranks agree (one all-reduce) whether a stop signal arrived on any rank or this evaluation's time budget
is spent: a Slurm warning ends the evaluation at once, unfinished tasks are reported as stopped, and
the loop goes on to save for requeue. Results go to <output_dir>/eval/iter_NNNNNNN/ and into the
metrics as tasks/<task>/<metric>; the run's plot (metrics.html) is redrawn after each evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.pretrain.evaluate.megatron_backend import MegatronBackend, SPMCodec, codec_for
from kumihimo.pretrain.evaluate.runner import describe, flat_metrics, run_tasks, write_results
from kumihimo.pretrain.evaluate.suites import load_entries
from kumihimo.pretrain.evaluate.tasks import Task

if TYPE_CHECKING:
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.signals import StopRequest

log = stage_logger("eval")


def source_metrics(evaluate: Callable, datasets: dict) -> dict[str, float]:
    """valid/<source>/loss and ppl: `evaluate(dataset)` (the trainer's validation pass) per source."""
    out = {}
    for name, dataset in datasets.items():
        loss = evaluate(dataset)
        out[f"valid/{name}/loss"] = loss
        out[f"valid/{name}/ppl"] = perplexity(loss)
    if out:
        shown = ", ".join(f"{name} {out[f'valid/{name}/loss']:.4f}" for name in datasets)
        log.info(f"validation loss per source: {shown}")
    return out


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))  # exp(80) is already meaningless; avoid inf in the sinks


class InLoopEvaluation:
    def __init__(
        self,
        tasks: list[Task],
        interval: int,
        batch_size: int,
        max_seconds: float | None,
        backend: MegatronBackend,
        codec: SPMCodec,
        output_dir: Path,
        is_logger: bool,
    ):
        self.tasks = tasks
        self.interval = interval
        self.batch_size = batch_size
        self.max_seconds = max_seconds
        self.backend = backend
        self.codec = codec
        self.output_dir = output_dir
        self.is_logger = is_logger

    @classmethod
    def from_config(
        cls, config: TrainConfig, model_chunks: list, device: torch.device, output_dir: Path, is_logger: bool
    ) -> InLoopEvaluation | None:
        """None when no tasks are configured."""
        ev = config.evaluation
        if not ev.tasks:
            return None
        if config.data.tokenizer is None:
            raise UserError(
                "evaluation.tasks needs the tokenizer to encode prompts, but data.tokenizer is null; set "
                "data.tokenizer=<SentencePiece .model or Hugging Face tokenizer folder> (mock data accepts one too)"
            )
        from kumihimo.tokenizer.base import load_tokenizer

        tokenizer = load_tokenizer(config.data.tokenizer)
        tasks = load_entries(ev.tasks)
        backend = MegatronBackend(model_chunks, tokenizer.vocab_size, config.model.context_length, device)
        interval = ev.interval or config.schedule.eval_interval
        if not interval:
            raise UserError(
                f"evaluation.tasks={ev.tasks} would never run: evaluation.interval is null and "
                "schedule.eval_interval=0; set evaluation.interval=<steps>"
            )
        return cls(
            tasks,
            interval,
            ev.batch_size,
            ev.max_seconds,
            backend,
            codec_for(tokenizer),
            output_dir,
            is_logger,
        )

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def run(self, step: int, stop: StopRequest) -> dict[str, float]:
        """Score every task on the model as it is now; every rank calls this."""
        started = time.monotonic()
        device = self.backend.device

        def should_stop() -> bool:
            over = self.max_seconds is not None and time.monotonic() - started > self.max_seconds
            flag = torch.tensor([1.0 if (stop.received is not None or over) else 0.0], device=device)
            if dist.is_initialized():  # time differs per rank: agree, or ranks would part ways
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item() > 0)

        for chunk in self.backend.model:
            chunk.eval()
        try:
            results = run_tasks(self.tasks, self.backend, self.codec, self.batch_size, should_stop)
        finally:
            for chunk in self.backend.model:
                chunk.train()
        if self.is_logger:
            write_results(results, self.output_dir / "eval" / f"iter_{step:07d}", {"iteration": step})
            log.info(f"step {step}: {describe(results)}")
        return flat_metrics(results)

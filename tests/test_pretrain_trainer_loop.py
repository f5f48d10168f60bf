"""The training loop's own bookkeeping, one process and no model build: evaluation leaves the model in
train mode whatever happens, and a GPU synchronizes only for the steps whose time is reported."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from kumihimo.core import configtree
from kumihimo.pretrain import training
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.metrics import MetricsSink, StepTimer

TINY = "configs/pretrain/tiny-cpu.yaml"


def test_evaluate_switches_back_to_train_mode_when_it_raises(monkeypatch):
    trainer = training.Trainer(configtree.load(TrainConfig, TINY, []))
    chunks = [torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)]
    trainer.model = chunks
    trainer.memory_meter = None
    trainer.device = torch.device("cpu")
    trainer.layout = SimpleNamespace(global_batch_size=8, num_microbatches=2, micro_batch_size=4)
    trainer.datasets = SimpleNamespace(valid=None)
    monkeypatch.setattr(training.parallel_state, "get_data_parallel_rank", lambda: 0)
    monkeypatch.setattr(training, "batch_indices", lambda *args: [[0]])
    monkeypatch.setattr(training, "microbatches", lambda *args: iter(()))
    seen_modes = []

    def failing_schedule(**kwargs):
        seen_modes.extend(chunk.training for chunk in chunks)
        raise RuntimeError("a bad validation batch")

    monkeypatch.setattr(training, "get_forward_backward_func", lambda: failing_schedule)
    with pytest.raises(RuntimeError, match="a bad validation batch"):
        trainer.evaluate()
    assert seen_modes == [False, False], "evaluation ran in train mode"
    assert all(chunk.training for chunk in chunks), "a failed evaluation left the model in eval mode"


def test_gpu_synchronizes_only_for_reported_steps():
    synchronized = []
    timer = StepTimer(lambda: synchronized.append(1))
    reported = [True, False, False, True, False, True]
    times = [timer.stop(time.perf_counter(), reported=flag) for flag in reported]
    assert len(synchronized) == reported.count(True)
    assert [t is not None for t in times] == reported
    assert all(t >= 0 for t in times if t is not None)


def test_cpu_times_every_step_without_synchronizing():
    timer = StepTimer(None)
    assert all(timer.stop(time.perf_counter(), reported=False) is not None for _ in range(3))


def test_reported_steps_follow_the_log_interval(tmp_path):
    config = configtree.load(TrainConfig, TINY, ["logging.log_interval=10"])
    sink = MetricsSink(config, tmp_path, enabled=False)
    assert [step for step in range(1, 31) if sink.prints(step, force=step in (1, 25))] == [1, 10, 20, 25, 30]

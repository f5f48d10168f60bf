"""Shared test helpers: run the real CLI in a subprocess, skip GPU tests without a GPU, a real Slurm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`kumihimo ARGS...` as a user runs it; returns the completed process (text output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return subprocess.run(
        [sys.executable, "-m", "kumihimo.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=env,
    )


def signal_training(
    run_dir: Path, *train_args: str, after_steps: int = 3, sig: signal.Signals = signal.SIGUSR1
) -> tuple[int, str]:
    """Start `kumihimo train TRAIN_ARGS...` (logging to run_dir), send `sig` once it has logged
    `after_steps` steps, and return its exit code and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    child = subprocess.Popen(
        [sys.executable, "-m", "kumihimo.cli", "train", *train_args],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= after_steps):
        assert time.monotonic() < deadline and child.poll() is None, "training did not start"
        time.sleep(0.05)
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=120)
    return child.returncode, stderr


DIVERGING = (
    "schedule.train_iters=30",
    "optimizer.lr=50",
    "optimizer.min_lr=0",
    "optimizer.clip_grad=0",
    "resilience.spike_factor=1.5",
    "resilience.spike_warmup_steps=1",
)
"""Overrides under which tiny-cpu's loss explodes within a few steps and the loss guard sees it (the
tests add resilience.on_bad_loss)."""


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node Slurm cluster on localhost (tests/slurm_cluster.py), one per test module."""
    from tests.slurm_cluster import running_cluster

    with running_cluster(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mounted for the test (root only); yields a function that mounts one of a given size."""
    mounts = []

    def mount(num_bytes: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={num_bytes}", "tmpfs", str(folder)], capture_output=True
        )
        if done.returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounts.append(folder)
        return folder

    yield mount
    for folder in mounts:
        subprocess.run(["umount", str(folder)], check=False)


def build_run_model(config, layout, padded_vocab_size: int) -> list:
    """`pretrain.model.build_model` handed the sections of a whole run config, as the trainer hands them."""
    from kumihimo.pretrain.model import build_model

    return build_model(
        config.model,
        config.precision,
        config.parallelism,
        config.fusions,
        layout,
        padded_vocab_size,
        device=config.runtime.device,
        seed=config.runtime.seed,
        deterministic=config.runtime.deterministic,
        micro_batch_size=config.schedule.micro_batch_size,
        reset_position_ids=config.data.reset_position_ids,
    )

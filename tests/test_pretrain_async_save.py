"""checkpoint.async_save: shards are written by a background process while training goes on, yet a
checkpoint holds the state of the moment it was taken, resumes exactly, and `latest` only ever points
at a complete checkpoint, whichever way the run ends.

The runs are the real `kumihimo train` CLI on the tiny CPU recipe (torchrun with 2 processes for TP=2);
the snapshot check runs the trainer in a subprocess (`python -m tests.test_pretrain_async_save`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kumihimo.pretrain.signals import EXIT_BAD_LOSS, EXIT_REQUEUE
from tests.conftest import DIVERGING, REPO, read_metrics, run_cli, signal_training

pytestmark = pytest.mark.slow  # training runs with background saves

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = (
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "schedule.train_iters=4",
    "logging.log_interval=1",
    "checkpoint.async_save=true",
)
TP2 = "parallelism.tensor_model_parallel_size=2"


def train(run_dir: Path, *overrides: str, nproc: int = 1, expect: int = 0) -> subprocess.CompletedProcess:
    args = ["train", TINY, *BASE, f"output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *overrides]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def assert_complete(root: Path, step: int) -> None:
    """`latest` names `step`, whose folder holds every file of a finished save; nothing is half-written."""
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == str(step)
    folder = root / f"iter_{step:07d}"
    for name in ("kumihimo.json", "run_config.yaml", "metadata.json", ".metadata", "__0_0.distcp"):
        assert (folder / name).is_file(), f"{folder} lacks {name}"
    assert json.loads((folder / "kumihimo.json").read_text())["train_state"]["iteration"] == step
    assert not list(root.glob("*.tmp")), "a half-written checkpoint was left behind"


def test_async_save_resumes_exactly_at_tp2(tmp_path):
    """4 steps saving after every step (each save still being written while the next step runs) ==
    2 steps, exit right after the save, resume, 2 steps: same losses and grad norms."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = train(straight, TP2, "checkpoint.save_interval=1", nproc=2)
    assert "written in the background" in proc.stderr
    assert_complete(straight / "ckpt", 4)  # the run ends right after its final save

    train(resumed, TP2, "schedule.exit_after_iters=2", nproc=2)
    assert_complete(resumed / "ckpt", 2)
    proc = train(resumed, TP2, nproc=2)
    assert "resumed from" in proc.stderr
    reference, continued = read_metrics(straight), read_metrics(resumed)
    assert [m["step"] for m in continued] == [1, 2, 3, 4]
    assert [m["loss"] for m in continued] == [m["loss"] for m in reference]
    assert [m["grad_norm"] for m in continued] == [m["grad_norm"] for m in reference]


def test_async_save_is_a_snapshot(tmp_path):
    """Weights, Adam moments and the step changed right after the save call, while the (slowed)
    writer has not read them yet, do not reach the checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_pretrain_async_save", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "snapshot ok" in proc.stdout


def test_requeue_signal_waits_for_the_background_save(tmp_path):
    """SIGUSR1 while saves are in flight: the run saves, finishes writing, points `latest` at that
    step and exits with the requeue code."""
    returncode, stderr = signal_training(
        tmp_path,
        TINY,
        *BASE,
        "schedule.train_iters=40",
        "checkpoint.save_interval=1",
        f"output_dir={tmp_path}",
        f"checkpoint.dir={tmp_path}/ckpt",
    )
    assert returncode == EXIT_REQUEUE, stderr[-2000:]
    stopped_at = read_metrics(tmp_path)[-1]["step"]
    assert 3 <= stopped_at < 40
    assert_complete(tmp_path / "ckpt", stopped_at)


def test_bad_loss_exit_finishes_the_pending_save(tmp_path):
    """The loss guard stops the run one step after a save was started: that save still completes."""
    train(
        tmp_path,
        *DIVERGING,
        "resilience.on_bad_loss=stop",
        "checkpoint.save_interval=1",
        expect=EXIT_BAD_LOSS,
    )
    stopped_at = next(m["step"] for m in read_metrics(tmp_path) if m["skipped"])
    assert stopped_at > 1, "the first step already diverged; nothing was saved before it"
    assert_complete(tmp_path / "ckpt", stopped_at - 1)


def _save_then_change_everything(run_dir: str) -> None:
    """Train one step, start an async save with a writer that waits 2 s before reading the tensors,
    change every weight, Adam moment and the step in place, let the save finish, load it back."""
    import torch
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from kumihimo.core import configtree
    from kumihimo.pretrain import checkpoint_format, checkpointing
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.distributed import destroy, unwrap
    from kumihimo.pretrain.training import Trainer

    def tensors(trainer):
        weights = [p for chunk in trainer.model for p in unwrap(chunk).parameters()]
        inner = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
        moments = [
            state[name]
            for opt in inner
            for state in opt.optimizer.state.values()
            for name in ("exp_avg", "exp_avg_sq")
        ]
        assert weights and moments
        return weights + moments

    write = FileSystemWriterAsync.write_preloaded_data_multithread

    def slow_write(*args, **kwargs):  # runs in the forked writer process
        time.sleep(2)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data_multithread = staticmethod(slow_write)
    root = Path(run_dir) / "ckpt"
    config = configtree.load(
        TrainConfig,
        TINY,
        [
            *BASE,
            "schedule.exit_after_iters=1",
            "checkpoint.save_at_end=false",
            f"output_dir={run_dir}",
            f"checkpoint.dir={root}",
        ],
    )
    trainer = Trainer(config)
    try:
        trainer.setup()
        trainer.train()
        saved = [t.detach().clone() for t in tensors(trainer)]
        folder = trainer.save()
        with torch.no_grad():
            for tensor in tensors(trainer):
                tensor.add_(1.0)
        trainer.state.iteration += 1
        assert trainer.checkpoints.async_saves.pending and not folder.exists(), "the save is not in flight"
        trainer.checkpoints.finish_pending(blocking=True)
        assert checkpoint_format.read_latest(root) == 1
        state = checkpointing.load_checkpoint(
            folder, trainer.model, trainer.optimizer, trainer.scheduler, trainer.layout
        )
        assert state.iteration == 1
        loaded = tensors(trainer)
        assert len(loaded) == len(saved)
        assert all(torch.equal(now, then) for now, then in zip(loaded, saved)), "a later change leaked in"
        print("snapshot ok")
    finally:
        destroy()


if __name__ == "__main__":
    _save_then_change_everything(sys.argv[1])

"""Stop signals save and exit with the requeue code; the resumed run ends where an uninterrupted one
does. Bad losses are skipped or stop the run, as configured."""

from __future__ import annotations

import pytest

from kumihimo.pretrain.signals import EXIT_BAD_LOSS, EXIT_REQUEUE, LossGuard
from tests.conftest import DIVERGING, read_metrics, run_cli, signal_training

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = ("schedule.lr_warmup_iters=1", "schedule.eval_interval=0", "logging.log_interval=1")


def test_loss_guard_flags_nan_inf_and_spikes():
    guard = LossGuard(spike_factor=2.0, warmup_steps=2)
    assert not guard.check(float("nan")).ok
    assert not guard.check(float("inf")).ok
    assert guard.check(5.0).ok and guard.check(4.0).ok
    verdict = guard.check(20.0)
    assert not verdict.ok and "over 2.0 x the running mean" in verdict.reason
    assert guard.check(4.5).ok  # a spike does not move the running mean
    assert LossGuard(None, 0).check(1e9).ok  # no spike check without a factor


@pytest.mark.slow
def test_sigusr1_saves_exits_for_requeue_and_resume_finishes_the_same(tmp_path):
    straight = tmp_path / "straight"
    proc = run_cli(
        "train",
        TINY,
        *BASE,
        "schedule.train_iters=40",
        f"output_dir={straight}",
        "checkpoint.enabled=false",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    run_dir = tmp_path / "signalled"
    returncode, stderr = signal_training(
        run_dir,
        TINY,
        *BASE,
        "schedule.train_iters=40",
        f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir}/ckpt",
    )
    assert returncode == EXIT_REQUEUE, stderr[-2000:]
    assert "stop signal received" in stderr
    stopped_at = int((run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= stopped_at < 40

    proc = run_cli(
        "train",
        TINY,
        *BASE,
        "schedule.train_iters=40",
        f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir}/ckpt",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed, reference = read_metrics(run_dir), read_metrics(straight)
    assert [m["step"] for m in resumed] == list(range(1, 41))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "expect_skips"), [("stop", 0), ("skip", 2)])
def test_diverging_run_is_skipped_then_stopped(tmp_path, policy, expect_skips):
    """A learning rate of 50 makes the loss explode; the guard skips (then gives up) or stops at once."""
    proc = run_cli(
        "train",
        TINY,
        *BASE,
        *DIVERGING,
        f"resilience.on_bad_loss={policy}",
        "resilience.max_consecutive_skips=3",
        f"output_dir={tmp_path}",
        f"checkpoint.dir={tmp_path}/ckpt",
        timeout=240,
    )
    assert proc.returncode == EXIT_BAD_LOSS, proc.stderr[-2000:]
    assert "stopping at step" in proc.stderr
    metrics = read_metrics(tmp_path)
    skipped = [m for m in metrics if m["skipped"]]
    assert skipped, "no step was judged bad"
    assert len(skipped) == (1 if policy == "stop" else 3)
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    del expect_skips


@pytest.mark.slow
def test_nan_stop_recovers_by_resuming_with_a_lower_learning_rate(tmp_path):
    """docs/guarantees.md's recovery from exit 4: resume from the newest (finite) checkpoint with a lower
    optimizer.lr and min_lr. The resume must load (Megatron matched param groups by their saved learning
    rates and refused), say what changed, and train on with the new rates."""
    run = (*BASE, f"output_dir={tmp_path}", f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.save_interval=1")
    diverging = (*DIVERGING, "resilience.on_bad_loss=stop")
    proc = run_cli("train", TINY, *run, *diverging, timeout=240)
    assert proc.returncode == EXIT_BAD_LOSS, proc.stderr[-2000:]
    saved = int((tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 1

    lower = ("optimizer.lr=1e-3", "optimizer.min_lr=1e-4", f"schedule.exit_after_iters={saved + 3}")
    proc = run_cli("train", TINY, *run, *diverging[:1], *lower, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resumed from {tmp_path / 'ckpt'}" in proc.stderr
    assert "optimizer.lr 50 -> 0.001; optimizer.min_lr 0 -> 0.0001" in proc.stderr
    after = read_metrics(tmp_path)[-3:]  # the file also holds the first run's steps
    assert [m["step"] for m in after] == [saved + 1, saved + 2, saved + 3]
    assert all(1e-4 <= m["lr"] <= 1e-3 for m in after), [m["lr"] for m in after]
    assert not any(m["skipped"] for m in after)

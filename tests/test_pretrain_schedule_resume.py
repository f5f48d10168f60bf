"""Issue 23 point 5: a schedule changed at resume (a longer schedule.train_iters) applies from the
resumed step, and the resume says so (docs/guarantees.md, "At resume")."""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_cli

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = ("schedule.lr_warmup_iters=1", "schedule.eval_interval=0", "logging.log_interval=1")


@pytest.mark.slow
def test_longer_train_iters_at_resume_applies_the_new_decay(tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    run = (*BASE, f"output_dir={resumed}", f"checkpoint.dir={resumed}/ckpt", "checkpoint.save_interval=4")
    proc = run_cli("train", TINY, *run, "schedule.train_iters=6", "schedule.exit_after_iters=4", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("train", TINY, *run, "schedule.train_iters=10", "schedule.exit_after_iters=5", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schedule.train_iters 6 -> 10 since iter_0000004: this run's schedule applies from step 4" in (
        proc.stderr
    ), proc.stderr[-3000:]
    proc = run_cli(
        "train",
        TINY,
        *BASE,
        f"output_dir={straight}",
        "checkpoint.enabled=false",
        "schedule.train_iters=10",
        "schedule.exit_after_iters=5",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed_lr = {m["step"]: m["lr"] for m in read_metrics(resumed)}
    straight_lr = {m["step"]: m["lr"] for m in read_metrics(straight)}
    assert resumed_lr[5] == straight_lr[5]
    assert resumed_lr[4] != straight_lr[4]  # the first run's step 4 followed the 6-step decay

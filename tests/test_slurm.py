"""The training batch script on a real Slurm: a one-node cluster on localhost (the `cluster` fixture,
tests/slurm_cluster.py).

Jobs are rendered by `kumihimo slurm submit --profile local-cpu` from slurm/train.sbatch: two tasks
(gloo, TP=2) of the tiny recipe on mock data. One job runs straight through; another is given a short
time limit once it trains, so Slurm's --signal warning stops it mid-run; it must save, requeue itself,
resume in its next allocation and end with the same losses, step for step, as the straight run.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_metrics
from tests.slurm_cluster import SlurmCluster, finished

pytestmark = pytest.mark.slow

# ~50 s of training on 2 cores: Slurm checks time limits only every 30 s, so the warning signal can come
# up to 30 s after it is due, and it must still find the run training.
NUM_STEPS = 200
TRAIN = (
    "configs/pretrain/tiny-cpu.yaml",
    "parallelism.tensor_model_parallel_size=2",
    f"schedule.train_iters={NUM_STEPS}",
    "schedule.global_batch_size=16",
    "schedule.lr_warmup_iters=5",
    "schedule.eval_interval=0",
    "logging.log_interval=10",
)


def submit(cluster: SlurmCluster, run_dir: Path, *options: str) -> tuple[str, Path]:
    """`kumihimo slurm submit` the tiny recipe on 2 processes; later overrides in `options` win."""
    proc = cluster.run(
        sys.executable,
        "-m",
        "kumihimo.cli",
        "slurm",
        "submit",
        *TRAIN,
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "--profile",
        "local-cpu",
        f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir}/ckpt",
        *options,
    )
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job_id, run_dir / f"slurm-{job_id}.out"


@pytest.fixture(scope="module")
def straight_run(cluster: SlurmCluster, tmp_path_factory) -> tuple[Path, dict[str, str], str, float]:
    run_dir = tmp_path_factory.mktemp("straight")
    start = time.monotonic()
    job_id, log = submit(cluster, run_dir, "--time", "00:10:00")
    info = cluster.wait(job_id, finished, timeout=300, log=log)
    return run_dir, info, log.read_text(), time.monotonic() - start


def test_two_task_job_runs_doctor_trains_and_saves(straight_run):
    run_dir, info, log, seconds = straight_run
    print(f"\nstraight job: {seconds:.0f} s")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "gloo all-reduce over 2 rank(s)" in log, log[-3000:]
    # no GPU on the test cluster, so doctor warns (never fails) about it
    assert re.search(r"^doctor: (all checks passed|no failures; \d+ warning\(s\) above)$", log, re.M), log[
        -3000:
    ]
    assert "world=2: TP=2 PP=1 CP=1 DP=1" in log
    assert "[slurm] training finished" in log
    assert (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(NUM_STEPS)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, NUM_STEPS + 1))


def test_time_limit_signal_saves_requeues_and_resumes_to_the_same_losses(cluster, straight_run, tmp_path):
    reference_dir = straight_run[0]
    start = time.monotonic()
    job_id, log = submit(cluster, tmp_path, "--time", "00:10:00", "--signal-before", "60")
    metrics = tmp_path / "metrics.jsonl"
    cluster.wait(
        job_id, lambda _: metrics.is_file() and metrics.read_text().count("\n") >= 1, timeout=120, log=log
    )
    # Training runs: shorten the limit (whole minutes) to 30-90 s from now. Slurm checks limits every 30 s
    # and sends the --signal once the limit is less than 60 + 30 s away, so USR1 arrives within 30 s and
    # at least one check before the limit. (Set only once training runs: a slow start-up would otherwise be
    # signalled before the trainer listens.)
    hours, minutes, seconds = map(int, cluster.job(job_id)["RunTime"].split("-")[-1].split(":"))
    elapsed = hours * 3600 + minutes * 60 + seconds
    cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={(elapsed + 90) // 60}")
    cluster.wait(job_id, lambda info: int(info.get("Restarts", 0)) >= 1, timeout=120, log=log)
    requeued = time.monotonic()
    cluster.run(
        "scontrol", "update", f"JobId={job_id}", "TimeLimit=10"
    )  # the next allocation runs to the end
    info = cluster.wait(job_id, finished, timeout=300, log=log)
    print(
        f"\nrequeued job: signalled and requeued after {requeued - start:.0f} s, done after "
        f"{time.monotonic() - start:.0f} s"
    )
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-3000:]
    stopped_at = int(re.search(r"stop signal received: saving at step (\d+)", text).group(1))
    assert 1 <= stopped_at < NUM_STEPS
    assert "[slurm] exit 3: stopped by a signal after saving a checkpoint; requeueing" in text
    # One log for both allocations (--open-mode=append): restart 0, the requeue, restart 1 resuming.
    assert f"[slurm] job {job_id} restart 0 " in text and f"[slurm] job {job_id} restart 1 " in text
    assert re.search(rf"resumed from \S+iter_{stopped_at:07d} at step {stopped_at}", text)
    assert "[slurm] training finished" in text
    resumed, reference = read_metrics(tmp_path), read_metrics(reference_dir)
    assert [m["step"] for m in resumed] == list(range(1, NUM_STEPS + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]


def test_torchrun_variant_passes_the_trainers_exit_code_and_explains_it(cluster, tmp_path):
    """A diverging run stops with exit 4; through the per-node launcher the job fails with 4 and says why."""
    start = time.monotonic()
    job_id, log = submit(
        cluster,
        tmp_path,
        "--launcher",
        "torchrun",
        "--time",
        "00:10:00",
        "schedule.train_iters=30",
        "optimizer.lr=50",
        "optimizer.min_lr=0",
        "optimizer.clip_grad=0",
        "resilience.on_bad_loss=stop",
        "resilience.spike_factor=1.5",
        "resilience.spike_warmup_steps=1",
    )
    info = cluster.wait(job_id, finished, timeout=240, log=log)
    print(f"\ntorchrun-variant job: {time.monotonic() - start:.0f} s")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "4:0"), text[-3000:]
    assert "gloo all-reduce over 2 rank(s)" in text, "doctor ran under the per-node launcher"
    assert "stopping at step" in text and "exited with 4; returning it" in text
    assert "[slurm] exit 4: bad loss (NaN/Inf or a spike); the newest checkpoint is the last good one" in text

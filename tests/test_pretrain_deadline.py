"""Issue 27.3: a run given a deadline (schedule.exit_after_minutes, or the Slurm/PBS job's end) saves and
exits for requeue before it, without a signal; the chained run resumes with the same losses."""

from __future__ import annotations

import re
import time
from datetime import datetime

import pytest

from kumihimo.core.configtree import ConfigError, load
from kumihimo.pretrain import fault_injection
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.deadline import Deadline, pbs_end_time, slurm_end_time
from kumihimo.pretrain.signals import EXIT_REQUEUE
from tests.conftest import REPO, read_metrics, run_cli

TINY = "configs/pretrain/tiny-cpu.yaml"

QSTAT = """Job Id: 1234.pbs1
    Job_Name = kumihimo-train
    Resource_List.select = 2:ngpus=8
    Resource_List.walltime = 02:30:00
    stime = Sun Dec  6 07:00:00 2026
"""


def test_the_slurm_end_comes_from_the_environment_or_squeue():
    assert slurm_end_time({"SLURM_JOB_END_TIME": "1796540400"}) == 1796540400.0
    asked = []

    def squeue(command):
        asked.append(command)
        return "2026-12-06T08:45:00\n"

    end = slurm_end_time({"SLURM_JOB_ID": "77"}, squeue)
    assert asked == [["squeue", "-h", "-j", "77", "-o", "%e"]]
    assert end == datetime(2026, 12, 6, 8, 45).timestamp()
    assert slurm_end_time({"SLURM_JOB_ID": "77"}, lambda c: "Unknown\n") is None  # no time limit
    assert slurm_end_time({}, squeue) is None and len(asked) == 1  # outside Slurm nothing is asked


def test_the_pbs_end_is_its_start_plus_walltime():
    end = pbs_end_time({"PBS_JOBID": "1234.pbs1"}, lambda c: QSTAT)
    assert end == datetime(2026, 12, 6, 9, 30).timestamp()
    assert pbs_end_time({"PBS_JOBID": "1234.pbs1"}, lambda c: "") is None
    assert pbs_end_time({}, lambda c: QSTAT) is None


def test_the_earliest_end_applies_and_keeps_a_step_a_save_and_the_margin_free():
    started = 1000.0
    env = {"SLURM_JOB_END_TIME": str(int(started + 600))}
    deadline = Deadline.from_schedule(30.0, True, 1.0, started, env=env)
    assert deadline.end == started + 600 and "Slurm job" in deadline.source
    deadline = Deadline.from_schedule(5.0, True, 1.0, started, env=env)
    assert deadline.end == started + 300 and deadline.source == "schedule.exit_after_minutes=5"
    deadline.note_step(10.0)
    deadline.note_save(40.0)  # + the 60 s margin: 110 s kept free
    assert not deadline.due(started + 189.0)
    assert deadline.due(started + 191.0)
    assert not Deadline.from_schedule(None, False, 1.0, started, env=env).due(1e12)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule.exit_after_minutes=0", "schedule.exit_after_minutes=0.0 must be > 0"),
        ("schedule.exit_margin_minutes=-1", "schedule.exit_margin_minutes=-1.0 must be >= 0"),
    ],
)
def test_bad_deadline_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load(TrainConfig, REPO / TINY, [override])


@pytest.mark.slow
def test_a_run_stops_before_its_deadline_with_a_checkpoint_and_the_chained_run_matches(tmp_path, monkeypatch):
    base = ("schedule.train_iters=1000", "schedule.eval_interval=0", "logging.log_interval=1")
    # the timed run's steps are slowed (a sleep per micro-batch, which leaves the losses alone), so that
    # it stops after a few dozen steps and the uninterrupted reference run has only those to train
    monkeypatch.setenv(fault_injection.FAULT_ENV, "slow:0:1:0.5")
    run = (
        *base,
        f"output_dir={tmp_path / 'run'}",
        "checkpoint.save_interval=0",
        "checkpoint.save_at_end=false",
    )
    started = time.time()
    proc = run_cli(
        "train",
        TINY,
        *run,
        "schedule.exit_after_minutes=0.4",
        "schedule.exit_margin_minutes=0.05",
        timeout=300,
    )
    monkeypatch.delenv(fault_injection.FAULT_ENV)
    assert proc.returncode == EXIT_REQUEUE, proc.stderr[-3000:]
    assert "[train] deadline: saving and exiting for requeue before" in proc.stderr
    assert "the deadline is near: saving at step" in proc.stderr
    checkpoints = tmp_path / "run" / "checkpoints"
    stopped_at = int((checkpoints / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= stopped_at < 1000
    saved = checkpoints / f"iter_{stopped_at:07d}"
    announced = re.search(
        r"exiting for requeue before (\S+ \S+) \(schedule.exit_after_minutes=0.4\)", proc.stderr
    )
    end = datetime.strptime(announced.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
    assert started + 24 <= end + 1  # counted from the trainer's start, after the imports
    # complete before the deadline (announced to the second; the 3 s margin covers the unmeasured save)
    assert max(p.stat().st_mtime for p in saved.rglob("*")) < end + 1

    proc = run_cli("train", TINY, *run, f"schedule.exit_after_iters={stopped_at + 2}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    reference = tmp_path / "straight"
    proc = run_cli(
        "train",
        TINY,
        *base,
        f"output_dir={reference}",
        "checkpoint.enabled=false",
        f"schedule.exit_after_iters={stopped_at + 2}",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "run")}
    assert resumed == {m["step"]: m["loss"] for m in read_metrics(reference)}

"""Issue 27: a hung rank (stopped, not arriving at a collective, stuck in a save) is named with its host
and stacks and the job ends with the requeue code 5; the resumed run reproduces the losses. A slowed
rank is named as a straggler. The watchdog's pieces are tested on their own first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from kumihimo.core.configtree import ConfigError, load
from kumihimo.pretrain import fault_injection, stragglers, watchdog
from kumihimo.pretrain.config import TrainConfig
from kumihimo.pretrain.stragglers import StragglerDetector
from kumihimo.pretrain.watchdog import EXIT_HUNG, Beat, PhaseLimits
from tests.conftest import REPO, read_metrics

TINY = "configs/pretrain/tiny-cpu.yaml"

# faulthandler's dump of a rank waiting in the loss all-reduce, and of one sleeping in a save
WAITING = """Thread 0x00007f01 (most recent call first):
  File "/usr/lib/python3.12/threading.py", line 355 in wait
  File "/repo/pretrain/signals.py", line 75 in _watch_until_closed

Current thread 0x00007f02 (most recent call first):
  File "/venv/site-packages/torch/distributed/distributed_c10d.py", line 2806 in all_reduce
  File "/venv/site-packages/torch/distributed/c10d_logger.py", line 81 in wrapper
  File "/repo/pretrain/training.py", line 624 in _reduce_loss
  File "/repo/pretrain/training.py", line 473 in train
  File "/repo/kumihimo/cli.py", line 145 in <module>
"""
SLEEPING = """Current thread 0x00007f02 (most recent call first):
  File "/repo/pretrain/fault_injection.py", line 55 in inject
  File "/repo/pretrain/training.py", line 650 in save
  File "/repo/pretrain/training.py", line 480 in train
"""


def test_limits_are_learned_from_the_longest_phase_with_a_floor():
    limits = PhaseLimits(factor=5.0, floor_s=10.0, initial_s=600.0)
    assert limits.limit("step")[0] == 600.0  # nothing measured yet
    limits.record("step", 1.0)
    assert limits.limit("step") == (10.0, "resilience.hang_timeout_floor_s; longest step so far 1.00 s")
    limits.record("step", 4.0)
    limits.record("step", 3.0)
    assert limits.limit("step")[0] == 20.0
    assert limits.limit("save")[0] == 600.0  # each kind of phase learns its own


def test_a_beat_is_overdue_only_past_its_limit():
    beat = Beat(1, "node7", 42, 5, "save", started=100.0, limit=30.0, basis="")
    assert beat.overdue(129.0) is None
    assert beat.overdue(131.0) == pytest.approx(31.0)
    assert beat.doing() == "the save at step 5"
    assert Beat(1, "n", 42, 5, "finish", 100.0, None, "").overdue(1e9) is None


def test_stacks_tell_a_rank_waiting_in_a_collective_from_a_stuck_one():
    waiting = watchdog.main_thread_frames(WAITING)
    assert waiting[0].endswith("distributed_c10d.py:2806 in all_reduce")
    assert watchdog.waits_in_collective(waiting)
    stuck = watchdog.main_thread_frames(SLEEPING)
    assert stuck[0] == "/repo/pretrain/fault_injection.py:55 in inject"
    assert not watchdog.waits_in_collective(stuck)
    assert watchdog.main_thread_frames("") == []


def test_the_heartbeat_file_says_what_the_rank_does(tmp_path):
    beat = watchdog.Heartbeat(tmp_path, PhaseLimits(5.0, 10.0, 600.0), rank=3)
    beat.begin("step", 1)
    first = watchdog.read_beat(tmp_path)
    assert (first.rank, first.step, first.phase, first.limit) == (3, 1, "step", 600.0)
    beat.begin("step", 2)
    assert watchdog.read_beat(tmp_path).limit == 10.0  # the first step was measured
    beat.idle(2)
    assert watchdog.read_beat(tmp_path).limit is None
    assert not list(tmp_path.glob(".*.tmp"))
    off = watchdog.Heartbeat.from_env(None, 10.0, 600.0, rank=0)  # resilience.hang_timeout_factor=null
    off.begin("step", 1)  # a no-op


def test_the_process_state_shows_a_stopped_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.kill(child.pid, signal.SIGSTOP)
        for _ in range(100):
            if watchdog.process_state(child.pid) in ("T", "t"):
                break
            time.sleep(0.05)
        assert watchdog.process_state(child.pid) in ("T", "t")
    finally:
        child.kill()
        child.wait()


STOPS_ITSELF = """
import faulthandler, os, signal, sys, time
stacks = open(os.path.join(sys.argv[1], "stacks.txt"), "w")
faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True)
def frozen_here():
    os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(60)
frozen_here()
"""


STOPS_ITSELF_AMONG_THREADS = """
import faulthandler, os, signal, sys, threading
stacks = open(os.path.join(sys.argv[1], "stacks.txt"), "w")
faulthandler.register(signal.SIGUSR2, file=stacks, all_threads=True)
never = threading.Event()
for _ in range(8):
    threading.Thread(target=never.wait, daemon=True).start()
def frozen_here():
    os.kill(os.getpid(), signal.SIGSTOP)
def moved_on():
    while True:
        pass
frozen_here()
moved_on()
"""


def test_the_stacks_of_a_stopped_process_show_where_its_main_thread_stopped(tmp_path):
    """Sent to the process, the dump signal may be taken by any of its threads when it is continued,
    while the main thread runs on (here into moved_on); sent to the main thread, it is handled there
    before the main thread moves."""
    for attempt in range(6):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        child = _stopped_child(STOPS_ITSELF_AMONG_THREADS, folder)
        try:
            stacks = watchdog.dump_stacks(child.pid, folder, stopped=True)
            main = [block for block in stacks.split("\n\n") if "<module>" in block]
            assert len(main) == 1 and "in frozen_here" in main[0] and "in moved_on" not in main[0], stacks
        finally:
            child.kill()
            child.wait()


def _stopped_child(script: str, folder) -> subprocess.Popen:
    """`python -c script folder`, once it has stopped itself (SIGSTOP)."""
    child = subprocess.Popen([sys.executable, "-c", script, str(folder)])
    for _ in range(200):
        if watchdog.process_state(child.pid) in ("T", "t"):
            break
        time.sleep(0.05)
    return child


def test_a_stopped_process_gives_its_stacks_and_stays_stopped(tmp_path):
    child = _stopped_child(STOPS_ITSELF, tmp_path)
    try:
        stacks = watchdog.dump_stacks(child.pid, tmp_path, stopped=True)
        assert "in frozen_here" in stacks
        time.sleep(0.2)
        assert watchdog.process_state(child.pid) in ("T", "t")
    finally:
        child.kill()
        child.wait()


def test_a_bad_fault_spec_is_refused(monkeypatch):
    monkeypatch.setenv(fault_injection.FAULT_ENV, "freeze:1:5")
    fault_injection._fault.cache_clear()
    try:
        with pytest.raises(ValueError, match="is not KIND:RANK:STEP"):
            fault_injection.inject("stop", 1, 5)
    finally:
        fault_injection._fault.cache_clear()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resilience.hang_timeout_factor=1", "resilience.hang_timeout_factor=1.0 must be > 1"),
        ("resilience.hang_timeout_floor_s=0", "resilience.hang_timeout_floor_s=0.0 must be > 0"),
        ("resilience.straggler_interval=-1", "resilience.straggler_interval=-1 must be >= 0"),
        ("resilience.straggler_factor=0.5", "resilience.straggler_factor=0.5 must be > 1"),
    ],
)
def test_bad_resilience_values_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as error:
        load(TrainConfig, REPO / TINY, [override])
    assert "\n" not in str(error.value)


def test_a_straggler_is_named_with_host_and_ratio():
    detector = StragglerDetector(interval=10, factor=1.4, device=None, is_logger=False)
    detector.hosts = ["a", "b", "c", "d"]
    metrics = detector._judge(10, [1.0, 1.1, 2.5, 0.9], [0.1, 0.1, 1.5, 0.1])
    assert metrics["straggler_slowest_rank"] == 2
    assert [(row["rank"], row["host"], row["ratio"]) for row in metrics["stragglers"]] == [(2, "c", 2.381)]


SUPERVISOR_IMPORTS = """
import sys
from kumihimo import cli
from kumihimo.pretrain import watchdog
watchdog.supervise = lambda command: print("torch" in sys.modules, command[-1]) or 0
sys.exit(cli.main(["train", sys.argv[1], "logging.log_interval=3"]))
"""


def test_each_rank_s_supervisor_starts_its_trainer_without_importing_torch():
    """Under a launcher `kumihimo train` becomes its rank's supervisor before anything imports torch
    (the preflight did: one extra torch process per GPU, and seconds of start-up per launch)."""
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    env.pop(watchdog.HEARTBEAT_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", SUPERVISOR_IMPORTS, TINY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False", "logging.log_interval=3"]


class _FakeEvent:
    """A CUDA event stand-in: its time is the order of recording; it counts how often it is waited for."""

    recorded, waits = 0, 0

    def __init__(self, enable_timing: bool):
        assert enable_timing

    def record(self):
        _FakeEvent.recorded += 1
        self.at = _FakeEvent.recorded

    def synchronize(self):
        _FakeEvent.waits += 1

    def elapsed_time(self, end) -> float:
        return 1000.0 * (end.at - self.at)


def test_gpu_straggler_timing_waits_for_the_gpu_only_on_report_steps():
    """On a GPU the per-rank work is timed with events; nothing waits for the GPU between reports."""
    detector = StragglerDetector(interval=3, factor=1.4, device=None, is_logger=False)
    detector.active, detector.clock = True, stragglers.DeviceClock(_FakeEvent)
    finalize = detector.wrap_finalize(lambda: None)
    for _ in range(3):
        detector.start_step()
        finalize()
        finalize()  # a second call (e.g. another model chunk) keeps the first arrival
        detector.end_step()
    assert _FakeEvent.waits == 0
    assert detector.local_means() == (1.0, 0.0)  # each step: start event, then the arrival event
    assert _FakeEvent.waits == 3 and detector._steps == []


# ---------------------------------------------------------------- real 2-rank runs
CHAIN = (
    "schedule.train_iters=6",
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "logging.log_interval=1",
    "checkpoint.save_interval=1",
    "resilience.hang_timeout_floor_s=8",
    "resilience.hang_initial_timeout_s=60",
)


def _train(run_dir, *overrides: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    env.pop(fault_injection.FAULT_ENV, None)
    if fault:
        env[fault_injection.FAULT_ENV] = fault
    args = ["train", TINY, "--nproc-per-node", "2", *CHAIN, f"output_dir={run_dir}", *overrides]
    return subprocess.run(
        [sys.executable, "-m", "kumihimo.cli", *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=REPO,
        env=env,
    )


def _last_losses(run_dir) -> dict[int, float]:
    """Each step's loss as last logged (a resumed run logs again the steps after its checkpoint)."""
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def _watchdog_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[watchdog] rank")]


@pytest.mark.slow
def test_hangs_are_named_ended_for_requeue_and_the_resumed_run_matches(tmp_path):
    """One rank stopped with SIGSTOP, one not arriving at a collective, one stuck in a save: each ends
    the job with exit 5 naming rank 1 (stopped, or stuck in fault_injection) with its stacks, rank 0
    waiting in a collective; the chain of resumed runs then reproduces the uninterrupted losses. The
    reference run has rank 0 slowed, which the straggler report names and which leaves the losses alone."""
    reference = _train(
        tmp_path / "straight",
        "checkpoint.enabled=false",
        "resilience.straggler_interval=2",
        "resilience.straggler_factor=1.5",  # of two ranks, the slower is under 2 x their median (mean)
        fault="slow:0:1:1.0",
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    # the first report may miss it: both ranks' first step is slow (warm-up)
    assert re.search(r"\[stragglers\] step [246]: rank 0 on \S+ is 1\.\d+ x the median", reference.stderr)
    assert "[stragglers] step 2: rank 1" not in reference.stderr

    run = tmp_path / "hung"
    expected = {
        "stop:1:3": ("rank 1 on", "is stuck: step 3 has run", "the process is stopped"),
        "collective:1:4": ("rank 1 on", "is stuck: step 4 has run", "fault_injection.py"),
        "save:1:5": ("rank 1 on", "is stuck: the save at step 5 has run", "fault_injection.py"),
    }
    for fault, (who, what, where) in expected.items():
        proc = _train(run, fault=fault)
        assert proc.returncode == EXIT_HUNG, proc.stderr[-3000:]
        stuck = [line for line in _watchdog_lines(proc.stderr) if " is stuck: " in line]
        assert len(stuck) == 1 and who in stuck[0] and what in stuck[0] and where in stuck[0], stuck
        assert "over its limit of" in stuck[0]
        assert "[watchdog] Python stacks of rank 1" in proc.stderr
        assert "in inject" in proc.stderr.split("[watchdog] Python stacks of rank 1")[1]
        others = [line for line in _watchdog_lines(proc.stderr) if "rank 0 on" in line]
        assert all("waits in a collective" in line or "failed" in line for line in others), others

    finished = _train(run)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resumed from" in finished.stderr
    assert _last_losses(run) == _last_losses(tmp_path / "straight")
    reports = [m for m in read_metrics(tmp_path / "straight") if "stragglers" in m]
    assert [m["step"] for m in reports] == [2, 4, 6]
    assert all(m["straggler_slowest_rank"] == 0 for m in reports)
    assert any(row["rank"] == 0 and row["ratio"] > 1.5 for m in reports for row in m["stragglers"])

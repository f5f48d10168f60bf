"""The training batch script on a real Slurm: a one-node cluster on localhost.

The module fixture installs Debian's Slurm and MUNGE with apt-get when they are missing (root and a
package mirror needed; the test is skipped, saying so, only when apt cannot be used), writes a
slurm.conf for this machine under a temporary folder (own ports, state and spool folders, own munged
socket, so a system Slurm is left alone), starts munged, slurmctld and slurmd, and stops them at the end.

Jobs are rendered by `kumihimo slurm submit --profile local-cpu` from slurm/train.sbatch: two tasks
(gloo, TP=2) of the tiny recipe on mock data. One job runs straight through; another is given a short
time limit once it trains, so Slurm's --signal warning stops it mid-run; it must save, requeue itself,
resume in its next allocation and end with the same losses, step for step, as the straight run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pretrain.distributed import free_port
from tests.conftest import REPO, read_metrics

pytestmark = pytest.mark.slow

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_PROGRAMS = ("sbatch", "scontrol", "squeue", "sinfo", "scancel", "slurmctld", "slurmd", "munged")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
# ~50 s of training on 2 cores: Slurm checks time limits only every 30 s, so the warning signal can come
# up to 30 s after it is due, and it must still find the run training.
NUM_STEPS = 200
TRAIN = ("configs/pretrain/tiny-cpu.yaml", "parallelism.tensor_model_parallel_size=2",
         f"schedule.train_iters={NUM_STEPS}", "schedule.global_batch_size=16", "schedule.lr_warmup_iters=5",
         "schedule.eval_interval=0", "logging.log_interval=10")


def _which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + os.pathsep + SYSTEM_PATH)


def install_slurm() -> None:
    """apt-get install the Slurm daemons, client and MUNGE unless present (idempotent, non-interactive)."""
    if all(_which(p) for p in SLURM_PROGRAMS):
        return
    if os.geteuid() != 0 or _which("apt-get") is None:
        pytest.skip("Slurm is not installed and cannot be: installing it needs root and apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    if subprocess.run(install, env=env, capture_output=True, text=True).returncode != 0:
        update = subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
        if update.returncode != 0:
            pytest.skip(f"apt-get update failed (no network or mirror?): {update.stderr.strip()[-300:]}")
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"apt-get install {' '.join(APT_PACKAGES)} failed:\n{proc.stderr[-2000:]}"
    missing = [p for p in SLURM_PROGRAMS if not _which(p)]
    assert not missing, f"installed {APT_PACKAGES} but {missing} are not on PATH"



def write_slurm_conf(root: Path, munge_socket: Path) -> Path:
    """One node, `localhost` (always resolvable: the job's rendezvous host), with this machine's CPUs."""
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=kumihimo-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
# cred_expire also delays a requeued job's restart (default 120 s).
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups (containers and CI runners rarely delegate them): plain process tracking.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert not check or proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, until: Callable[[dict[str, str]], bool], timeout: float, log: Path) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                tail = log.read_text()[-3000:] if log.is_file() else "(no log)"
                pytest.fail(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s; log:\n{tail}")
            time.sleep(0.5)

    def submit(self, run_dir: Path, *options: str) -> tuple[str, Path]:
        """`kumihimo slurm submit` the tiny recipe on 2 processes; later overrides in `options` win."""
        proc = self.run(sys.executable, "-m", "kumihimo.cli", "slurm", "submit", *TRAIN, "--nodes", "1",
                        "--gpus-per-node", "2", "--profile", "local-cpu", f"runtime.run_dir={run_dir}",
                        f"checkpoint.save={run_dir}/ckpt", *options)
        job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
        return job_id, run_dir / f"slurm-{job_id}.out"


def _start(cluster: SlurmCluster, name: str, *command: str) -> None:
    log = (cluster.root / f"{name}.out").open("w")
    cluster.daemons.append(subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT))


def _wait_for(condition: Callable[[], bool], what: str, cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(cluster.root.glob("*.log"))
                             + sorted(cluster.root.glob("*.out")))
            pytest.fail(f"{what}: not ready after {timeout} s (exited: {dead})\n{logs}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    start = time.monotonic()
    install_slurm()
    installed = time.monotonic()
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    munge_socket = root / "munge.socket"
    conf = write_slurm_conf(root, munge_socket)
    # The job inherits this environment (sbatch exports it): the venv's `kumihimo` first, no launcher
    # variables from an enclosing job, our slurm.conf for the clients (scontrol requeue inside the job too).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_")) and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK",
                                                                            "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_CONF=str(conf), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
               f"{os.pathsep}{SYSTEM_PATH}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    cluster = SlurmCluster(root, env)
    try:
        _start(cluster, "munged", _which("munged"), "--foreground", "--force", f"--socket={munge_socket}",
               f"--key-file={key}", f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log",
               f"--seed-file={root}/munged.seed")
        _wait_for(munge_socket.exists, "munged", cluster)
        _start(cluster, "slurmctld", _which("slurmctld"), "-D", "-f", str(conf))
        _start(cluster, "slurmd", _which("slurmd"), "-D", "-f", str(conf), "-N", "localhost")
        _wait_for(lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
                  "the node to be idle", cluster)
        print(f"\nslurm: installed in {installed - start:.1f} s, cluster up in {time.monotonic() - installed:.1f} s")
        yield cluster
    finally:
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split() if cluster.daemons else []
        for job_id in jobs:
            cluster.run("scancel", job_id, check=False)
        deadline = time.monotonic() + 30
        while jobs and cluster.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for daemon in reversed(cluster.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def _finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in FINAL_STATES


@pytest.fixture(scope="module")
def straight_run(cluster: SlurmCluster, tmp_path_factory) -> tuple[Path, dict[str, str], str, float]:
    run_dir = tmp_path_factory.mktemp("straight")
    start = time.monotonic()
    job_id, log = cluster.submit(run_dir, "--time", "00:10:00")
    info = cluster.wait(job_id, _finished, timeout=300, log=log)
    return run_dir, info, log.read_text(), time.monotonic() - start


def test_two_task_job_runs_doctor_trains_and_saves(straight_run):
    run_dir, info, log, seconds = straight_run
    print(f"\nstraight job: {seconds:.0f} s")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "gloo all-reduce over 2 rank(s)" in log and "doctor: all checks passed" in log
    assert "world=2: TP=2 PP=1 CP=1 DP=1" in log
    assert "[slurm] training finished" in log
    assert (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(NUM_STEPS)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, NUM_STEPS + 1))


def test_time_limit_signal_saves_requeues_and_resumes_to_the_same_losses(cluster, straight_run, tmp_path):
    reference_dir = straight_run[0]
    start = time.monotonic()
    job_id, log = cluster.submit(tmp_path, "--time", "00:10:00", "--signal-before", "60")
    metrics = tmp_path / "metrics.jsonl"
    cluster.wait(job_id, lambda _: metrics.is_file() and metrics.read_text().count("\n") >= 1, timeout=120, log=log)
    # Training runs: shorten the limit (whole minutes) to 30-90 s from now. Slurm checks limits every 30 s
    # and sends the --signal once the limit is less than 60 + 30 s away, so USR1 arrives within 30 s and
    # at least one check before the limit. (Set only once training runs: a slow start-up would otherwise be
    # signalled before the trainer listens.)
    hours, minutes, seconds = map(int, cluster.job(job_id)["RunTime"].split("-")[-1].split(":"))
    elapsed = hours * 3600 + minutes * 60 + seconds
    cluster.run("scontrol", "update", f"JobId={job_id}", f"TimeLimit={(elapsed + 90) // 60}")
    cluster.wait(job_id, lambda info: int(info.get("Restarts", 0)) >= 1, timeout=120, log=log)
    requeued = time.monotonic()
    cluster.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")  # the next allocation runs to the end
    info = cluster.wait(job_id, _finished, timeout=300, log=log)
    print(f"\nrequeued job: signalled and requeued after {requeued - start:.0f} s, done after "
          f"{time.monotonic() - start:.0f} s")
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
    job_id, log = cluster.submit(tmp_path, "--launcher", "torchrun", "--time", "00:10:00", "schedule.train_iters=30",
                                 "optimizer.lr=50", "optimizer.min_lr=0", "optimizer.clip_grad=0",
                                 "resilience.on_bad_loss=stop", "resilience.spike_factor=1.5",
                                 "resilience.spike_warmup_steps=1")
    info = cluster.wait(job_id, _finished, timeout=240, log=log)
    print(f"\ntorchrun-variant job: {time.monotonic() - start:.0f} s")
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "4:0"), text[-3000:]
    assert "gloo all-reduce over 2 rank(s)" in text, "doctor ran under the per-node launcher"
    assert "stopping at step" in text and "exited with 4; returning it" in text
    assert "[slurm] exit 4: bad loss (NaN/Inf or a spike); the newest checkpoint is the last good one" in text

"""A real one-node Slurm cluster on localhost for tests (the `cluster` fixture in conftest.py).

`running_cluster` installs Debian's Slurm and MUNGE with apt-get when they are missing (root and a
package mirror needed; the calling test is skipped, saying so, only when apt cannot be used), writes a
slurm.conf for this machine under a temporary folder (own ports, state and spool folders, own munged
socket, so a system Slurm is left alone), starts munged, slurmctld and slurmd, and stops them (after
cancelling any job left) at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kumihimo.pretrain.distributed import free_port
from tests.conftest import REPO

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_PROGRAMS = ("sbatch", "scontrol", "squeue", "sinfo", "scancel", "slurmctld", "slurmd", "munged")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
PARTITION = "debug"


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
        assert proc.returncode == 0, (
            f"apt-get install {' '.join(APT_PACKAGES)} failed:\n{proc.stderr[-2000:]}"
        )
    missing = [p for p in SLURM_PROGRAMS if not _which(p)]
    assert not missing, f"installed {APT_PACKAGES} but {missing} are not on PATH"


def _memory_mb() -> int:
    """This machine's memory as slurmd counts it, a little less: a node claiming more than it has is drained."""
    with open("/proc/meminfo") as handle:
        total_kb = int(next(line for line in handle if line.startswith("MemTotal:")).split()[1])
    return total_kb // 1024 * 9 // 10


def write_slurm_conf(root: Path, munge_socket: Path) -> Path:
    """One node, `localhost` (always resolvable: the job's rendezvous host), with this machine's CPUs and
    memory (jobs that ask for memory per CPU, as datatrove's do, are rejected by a node with none)."""
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
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName={PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    return conf


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(
        self, *command: str, check: bool = True, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            command, env=env or self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        assert not check or proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (for an array job: its first element's line)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0] if out else ""))

    def jobs(self, job_id: str | None = None) -> list[dict[str, str]]:
        """`scontrol show job` as one dict per line: every element of an array job (of every job: None)."""
        out = self.run("scontrol", "show", "job", "-o", *([job_id] if job_id else [])).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]

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


def finished(info: dict[str, str]) -> bool:
    return info.get("JobState") in FINAL_STATES


def _start(cluster: SlurmCluster, name: str, *command: str) -> None:
    log = (cluster.root / f"{name}.out").open("w")
    cluster.daemons.append(subprocess.Popen(command, env=cluster.env, stdout=log, stderr=subprocess.STDOUT))


def _wait_for(condition: Callable[[], bool], what: str, cluster: SlurmCluster, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.args[0] for p in cluster.daemons if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()[-1500:]}"
                for p in sorted(cluster.root.glob("*.log")) + sorted(cluster.root.glob("*.out"))
            )
            pytest.fail(f"{what}: not ready after {timeout} s (exited: {dead})\n{logs}")
        time.sleep(0.2)


def _stop(cluster: SlurmCluster) -> None:
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


def job_environment() -> dict[str, str]:
    """The environment jobs inherit (sbatch exports it): the venv's `kumihimo` first, no launcher variables
    from an enclosing job, one thread per process. Callers add SLURM_CONF."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
        and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}{os.pathsep}{SYSTEM_PATH}",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        WANDB_MODE="disabled",
    )
    return env


def munge_key(root: Path) -> Path:
    """A fresh MUNGE key under `root`, readable by its owner only."""
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    return key


def start_munged_and_controller(cluster: SlurmCluster, munge_socket: Path, key: Path, conf: Path) -> None:
    """munged on `munge_socket` (its files under the cluster root), then slurmctld with `conf`."""
    root = cluster.root
    _start(
        cluster,
        "munged",
        _which("munged"),
        "--foreground",
        "--force",
        f"--socket={munge_socket}",
        f"--key-file={key}",
        f"--pid-file={root}/munged.pid",
        f"--log-file={root}/munged.log",
        f"--seed-file={root}/munged.seed",
    )
    _wait_for(munge_socket.exists, "munged", cluster)
    _start(cluster, "slurmctld", _which("slurmctld"), "-D", "-f", str(conf))


@contextmanager
def running_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Install (if needed) and start a one-node cluster with its files under `root`; stop it on exit."""
    start = time.monotonic()
    install_slurm()
    installed = time.monotonic()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    key = munge_key(root)
    munge_socket = root / "munge.socket"
    conf = write_slurm_conf(root, munge_socket)
    env = dict(job_environment(), SLURM_CONF=str(conf))  # our slurm.conf for scontrol inside jobs too
    cluster = SlurmCluster(root, env)
    try:
        start_munged_and_controller(cluster, munge_socket, key, conf)
        _start(cluster, "slurmd", _which("slurmd"), "-D", "-f", str(conf), "-N", "localhost")
        _wait_for(
            lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
            "the node to be idle",
            cluster,
        )
        print(
            f"\nslurm: installed in {installed - start:.1f} s, cluster up in {time.monotonic() - installed:.1f} s"
        )
        yield cluster
    finally:
        _stop(cluster)

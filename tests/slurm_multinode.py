"""A real three-node Slurm cluster on this machine, one Linux network namespace per node.

Each node `kn1`..`kn3` is a network namespace with its own address on a private bridge (a veth pair
per node, loopback up), running its own slurmd (`nsenter --net=/run/netns/NS slurmd -N knI`) in a
mount namespace of its own where one folder, `node_local`, is that node's own (local scratch). slurmctld and
munged run in the root namespace: slurmd and the jobs reach slurmctld at the bridge's address, and the
MUNGE socket is a file, which every namespace sees. The jobs' processes inherit their node's namespace,
so gloo, torch's rendezvous and srun's own traffic between nodes cross the veths and the bridge.

Nothing here touches the machine's other interfaces or routes: the bridge's subnet is private
(10.213.X.0/24, X from the test's process id), the namespaces, veths and bridge are named
`khmn<PID>...` and removed at the end, and those of an earlier run whose process is gone are removed
before starting. Needs root (namespaces), `ip` (iproute2, apt-get installed when missing) and util-linux's
nsenter/unshare; the test is skipped, saying which is missing, otherwise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kumihimo.pretrain.distributed import free_port
from tests.slurm_cluster import (
    PARTITION,
    SYSTEM_PATH,
    SlurmCluster,
    _stop,
    _wait_for,
    _which,
    install_slurm,
    job_environment,
    munge_key,
    start_munged_and_controller,
)

PREFIX = "khmn"
NUM_NODES = 3
CPUS_PER_NODE = 2
MEMORY_PER_NODE_MB = 4000


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert not check or proc.returncode == 0, f"ip {' '.join(args)} failed: {proc.stderr.strip()}"
    return proc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in _ip("netns", "pids", namespace, check=False).stdout.split()]


def kill_namespace_processes(namespace: str, sig: signal.Signals = signal.SIGKILL) -> list[int]:
    """Send `sig` to every process living in `namespace`; returns their ids."""
    pids = namespace_pids(namespace)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return pids


def _remove_network(tag: str) -> None:
    """Delete the namespaces (after killing what runs in them), veths and bridge named khmn<tag>..."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"{PREFIX}{tag}n"):
            kill_namespace_processes(name)
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(r"\d+:\s+([^:@\s]+)", line)
        if match and match.group(1).startswith(f"{PREFIX}{tag}"):
            _ip("link", "delete", match.group(1), check=False)


def remove_stale_networks() -> None:
    """Namespaces and links of earlier runs whose test process is gone (a killed pytest leaves them)."""
    names = _ip("netns", "list", check=False).stdout.split() + re.findall(
        r"\d+:\s+([^:@\s]+)", _ip("-o", "link", "show", check=False).stdout
    )
    for tag in {m.group(1) for n in names if (m := re.match(rf"{PREFIX}(\d+)", n))}:
        if not _alive(int(tag)):
            _remove_network(tag)


@dataclass
class Node:
    name: str
    namespace: str
    address: str
    interface: str
    """The node's end of its veth pair, inside its namespace."""


@dataclass
class MultiNodeCluster(SlurmCluster):
    nodes: list[Node] = field(default_factory=list)
    conf: Path | None = None
    slurmd: dict[str, subprocess.Popen] = field(default_factory=dict)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    @property
    def node_local(self) -> Path:
        """A folder that is a different one on every node (a bind mount in the node's mount namespace),
        like a compute node's local scratch disk; `local_folder(name)` is what node `name` sees there."""
        return self.root / "node-local"

    def local_folder(self, name: str) -> Path:
        return self.root / f"local-{name}"

    def start_slurmd(self, name: str) -> None:
        """slurmd of node `name` in its network namespace and in a mount namespace of its own, where
        `node_local` is that node's folder; the jobs it starts inherit both."""
        node = self.node(name)
        self.local_folder(name).mkdir(exist_ok=True)
        self.node_local.mkdir(exist_ok=True)
        log = (self.root / f"slurmd-{name}.out").open("a")
        # nsenter switches only the network namespace: `ip netns exec` would also mount a fresh /sys
        # without the cgroup file systems that slurmd's cgroup plugin needs at start.
        slurmd = [
            "nsenter",
            f"--net=/run/netns/{node.namespace}",
            _which("slurmd"),
            "-D",
            "-f",
            str(self.conf),
        ]
        script = f'mount --bind "$0" "$1" && exec {shlex.join(slurmd)} -N {name}'
        daemon = subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                str(self.local_folder(name)),
                str(self.node_local),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.slurmd[name] = daemon
        self.daemons.append(daemon)

    def kill_node(self, name: str) -> list[int]:
        """Stop a node the hard way: SIGKILL its slurmd and every job process in its namespace."""
        pids = kill_namespace_processes(self.node(name).namespace)
        daemon = self.slurmd.pop(name)
        daemon.wait(timeout=30)
        self.daemons.remove(daemon)  # a dead daemon would fail every later wait (_wait_for)
        return pids

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def wait_nodes(self, state: str, names: list[str] | None = None, timeout: float = 60) -> None:
        """Until every node in `names` is `state` and responding: sinfo appends "*" to a node slurmctld has
        not heard from since, e.g. since `State=RESUME`, and the scheduler passes over such a node."""
        names = names or [n.name for n in self.nodes]
        _wait_for(
            lambda: all(self.node_states().get(n, "") == state for n in names),
            f"nodes {names} to be {state} (now {self.node_states()})",
            self,
            timeout=timeout,
        )

    def update_node(self, name: str, *settings: str) -> None:
        self.run("scontrol", "update", f"NodeName={name}", *settings)


def _create_network(tag: str, subnet: str, num_nodes: int) -> tuple[str, list[Node]]:
    bridge = f"{PREFIX}{tag}br"
    _ip("link", "add", bridge, "type", "bridge")
    _ip("addr", "add", f"{subnet}.254/24", "dev", bridge)
    _ip("link", "set", bridge, "up")
    nodes = []
    for index in range(1, num_nodes + 1):
        namespace, host_end, node_end = (
            f"{PREFIX}{tag}n{index}",
            f"{PREFIX}{tag}h{index}",
            f"{PREFIX}{tag}v{index}",
        )
        _ip("netns", "add", namespace)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
        _ip("link", "set", node_end, "netns", namespace)
        _ip("link", "set", host_end, "master", bridge)
        _ip("link", "set", host_end, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "addr", "add", f"{subnet}.{index}/24", "dev", node_end)
        _ip("-n", namespace, "link", "set", node_end, "up")
        nodes.append(Node(f"kn{index}", namespace, f"{subnet}.{index}", node_end))
    return f"{subnet}.254", nodes


def write_slurm_conf(root: Path, munge_socket: Path, controller: str, nodes: list[Node]) -> Path:
    """Like the one-node cluster's, with one NodeName line per namespace and per-node slurmd files (%n).

    SlurmdTimeout is short (300 s by default) so a killed node is marked down within ~10-15 s."""
    conf = root / "slurm.conf"
    node_lines = "\n".join(
        f"NodeName={n.name} NodeAddr={n.address} CPUs={CPUS_PER_NODE} RealMemory={MEMORY_PER_NODE_MB} "
        "State=UNKNOWN"
        for n in nodes
    )
    conf.write_text(f"""\
ClusterName=kumihimo-multinode
SlurmctldHost=localhost({controller})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
SlurmdTimeout=10
KillWait=10
MinJobAge=600
{node_lines}
PartitionName={PARTITION} Nodes={",".join(n.name for n in nodes)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _check_can_run() -> None:
    if os.geteuid() != 0:
        pytest.skip("the multi-node cluster needs root: it creates network namespaces, veths and a bridge")
    if shutil.which("ip") is None and shutil.which("apt-get") is not None:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", PATH=SYSTEM_PATH)
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "iproute2"]
        subprocess.run(install, env=env, capture_output=True, text=True, timeout=300)
    missing = [p for p in ("ip", "nsenter", "unshare", "mount") if shutil.which(p, path=SYSTEM_PATH) is None]
    if missing:
        pytest.skip(f"the multi-node cluster needs {missing} (Debian: apt-get install iproute2 util-linux)")


@contextmanager
def running_multinode_cluster(root: Path, num_nodes: int = NUM_NODES) -> Iterator[MultiNodeCluster]:
    """Create the namespaces and start munged, slurmctld and one slurmd per node; undo it all on exit."""
    _check_can_run()
    start = time.monotonic()
    install_slurm()
    remove_stale_networks()
    tag = str(os.getpid())
    subnet = f"10.213.{os.getpid() % 250}"
    for directory in ("state", *(f"spool-kn{i}" for i in range(1, num_nodes + 1))):
        (root / directory).mkdir()
    key = munge_key(root)
    munge_socket = root / "munge.socket"
    env = job_environment()
    cluster = MultiNodeCluster(root, env)
    try:
        controller, cluster.nodes = _create_network(tag, subnet, num_nodes)
        cluster.conf = write_slurm_conf(root, munge_socket, controller, cluster.nodes)
        env["SLURM_CONF"] = str(cluster.conf)
        start_munged_and_controller(cluster, munge_socket, key, cluster.conf)
        for node in cluster.nodes:
            cluster.start_slurmd(node.name)
        cluster.wait_nodes("idle")
        print(f"\nslurm: {num_nodes} namespaced nodes up in {time.monotonic() - start:.1f} s")
        yield cluster
    finally:
        _tear_down(cluster, tag)


def _tear_down(cluster: MultiNodeCluster, tag: str) -> None:
    """Cancel jobs and stop the daemons (bounded: _stop waits at most ~30 s for the queue and 15 s per
    daemon), then kill whatever still runs in the namespaces and delete them, whatever failed before."""
    try:
        _stop(cluster)
    except Exception as exc:  # a hung or dead slurmctld must not keep the daemons and namespaces alive
        print(f"slurm multinode teardown: {type(exc).__name__}: {exc}; killing the daemons")
    finally:
        for daemon in cluster.daemons:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=15)
        _remove_network(tag)

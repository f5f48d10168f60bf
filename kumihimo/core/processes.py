"""Processes that die with their parent, one live run per output folder, and which process of a
launched job this one is (`process_info`, from the launcher's variables, without importing torch).

A `kill -9` of a run used to leave its pool workers alive (re-parented to PID 1), still writing into
the output folder, and an immediate re-run raced them. Two rules close that:

* `die_with_parent()` in every worker: Linux's parent-death signal kills the worker with SIGKILL the
  moment the process that started it dies, however it dies. The same holds for the torchrun that
  `kumihimo train --nproc-per-node` starts and for the ranks torchrun starts (`die_with_torchrun`).
* `RunLock` on the output folder: a re-run refuses while the previous run is alive (one line naming
  its pid and host) and takes over, with a note, when it is dead. The lock is an flock, which the
  kernel releases when its holder dies, plus the holder's pid, host and start time for the message
  and for shared file systems on which flock does not reach across nodes.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from kumihimo.core.errors import UserError
from kumihimo.core.files import TEMP_MARK, file_mode, make_output_folder

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Make this process receive SIGKILL when `parent_pid` (its parent) dies; exit now if it already has.

    The signal follows the *thread* that started the child, so the pool must be started from a thread
    that lives as long as the run (the main thread; concurrent.futures starts spawn workers from the
    thread that submits). Outside Linux this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def die_with_torchrun() -> None:
    """In a process torchrun started (a rank): receive SIGKILL when torchrun dies.

    torchrun killed with SIGKILL (or its own launcher dying, which kills it: `spawn_local`) used to
    leave both ranks running, re-parented to PID 1, still training and writing checkpoints. Armed first
    thing in `kumihimo.cli.entry`, before the slow imports; a torchrun that died before the signal was
    armed is caught by die_with_parent's parent check. torchrun starts its workers from its main
    thread, which lives as long as torchrun, so the signal fires only at its death."""
    if os.environ.get("TORCHELASTIC_RUN_ID") and os.environ.get("LOCAL_RANK") is not None:
        die_with_parent(os.getppid())


def _start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _owner_alive(owner: dict) -> bool:
    """Whether the process that wrote `owner` (on this host) still runs: same pid and start time."""
    pid, recorded = owner.get("pid"), owner.get("started")
    if not isinstance(pid, int) or not isinstance(recorded, int | float):
        return False
    started = _start_time(pid)
    return started is not None and abs(started - recorded) < 1.0


class RunLock:
    """Exclusive use of `folder` by one run: `with RunLock(folder, "curate"):`.

    On entry: refuses (UserError) while another run holds it; otherwise records this process and
    removes what a killed run left: temporary files (named with TEMP_MARK) at the top of `folder` and
    anywhere under its `owned` subfolders (only those: an output_dir may be a folder shared with other
    things), never one of `keep` (the run's inputs).
    """

    NAME = ".kumihimo.lock"

    def __init__(
        self,
        folder: str | os.PathLike,
        what: str,
        owned: tuple[str, ...] = (),
        key: str = "output_dir",
        keep: tuple[str | os.PathLike, ...] = (),
    ):
        self.folder = Path(folder)
        self.owned = owned
        self.keep = keep
        self.path = self.folder / self.NAME
        self.what = what
        self.key = key
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        make_output_folder(self.folder, self.key)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            except PermissionError as exc:  # a lock another user's killed run left behind
                raise UserError(
                    f"{self.key}={str(self.folder)!r} holds {self.path}, which this user cannot open "
                    f"({exc.strerror}); if no run is using the folder, delete that file and run again"
                ) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                raise self._in_use(owner) from None
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # the holder removed the file as we opened it; lock the new one
        previous = self._read(fd)
        if previous:
            self._check_dead(fd, previous)
        removed = remove_temporary_files(
            self.folder, self.owned, self.keep
        )  # no live run of ours owns them now
        if previous or removed:
            print(
                f"[{self.what}] {self.folder}: a previous run was killed"
                + (f" (pid {previous.get('pid')} since {previous.get('since', '?')})" if previous else "")
                + f"; removed {removed} unfinished temporary file(s) and continuing",
                file=sys.stderr,
            )
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _start_time(os.getpid()),
            "command": self.what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: see the inode check in __enter__
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {"pid": "?", "host": "?"}

    def _in_use(self, owner: dict) -> UserError:
        command, pid, host, since = (owner.get(k, "?") for k in ("command", "pid", "host", "since"))
        return UserError(
            f"{self.key}={str(self.folder)!r} is in use by another kumihimo run ({command}, pid {pid} on "
            f"{host} since {since}); wait for it to finish or stop it, then run again"
        )

    def _check_dead(self, fd: int, previous: dict) -> None:
        """`previous` did not remove its lock: it was killed, or runs on a host whose flock we cannot see."""
        if previous.get("host") != socket.gethostname():
            os.close(fd)
            raise UserError(
                f"{self.key}={str(self.folder)!r} has a lock of a run on another host "
                f"(pid {previous.get('pid', '?')} on {previous.get('host', '?')} since "
                f"{previous.get('since', '?')}); if that run is no longer running, delete {self.path} "
                "and run again"
            )
        if _owner_alive(previous):  # flock held by nobody, yet the owner runs: a file system without flock
            os.close(fd)
            raise self._in_use(previous)


def remove_temporary_files(
    folder: Path, owned: tuple[str, ...] = (), keep: tuple[str | os.PathLike, ...] = ()
) -> int:
    """Remove what kumihimo's writers leave when killed mid-write (names holding TEMP_MARK, which
    names the project) among the files at the top of `folder` and everything under its `owned`
    subfolders, never one of `keep` (the run's inputs); returns how many.

    Only safe while holding the folder's RunLock: a live run's temporary files look the same.
    """
    kept = {os.path.realpath(p) for p in keep}
    removed = 0

    def remove(path: Path) -> None:
        nonlocal removed
        if os.path.realpath(path) in kept:
            return
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1

    for name in os.listdir(folder):
        if TEMP_MARK in name and (folder / name).is_file():
            remove(folder / name)
    for root, dirs, names in (entry for sub in owned for entry in os.walk(folder / sub)):
        for name in [d for d in dirs if TEMP_MARK in d]:
            remove(Path(root) / name)
            dirs.remove(name)
        for name in names:
            if TEMP_MARK in name:
                remove(Path(root) / name)
    return removed


# (rank, world size, local rank) variables of the launchers we support, in order of preference.
_LAUNCHER_ENV = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun, one task per GPU
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),  # mpirun (LLM-jp)
)


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info() -> ProcessInfo:
    """This process's rank, world size and local rank as its launcher set them; (0, 1, 0) alone."""
    for rank_var, world_var, local_var in _LAUNCHER_ENV:
        if rank_var in os.environ and world_var in os.environ:
            return ProcessInfo(
                int(os.environ[rank_var]), int(os.environ[world_var]), int(os.environ.get(local_var, "0"))
            )
    return ProcessInfo(0, 1, 0)

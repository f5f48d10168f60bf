"""Hang detection: every rank's trainer writes a heartbeat, and a small supervisor process beside it
ends the rank when the heartbeat stalls past a limit learned from the run's own step times.

A thread inside the trainer cannot act when the process is stopped (SIGSTOP, a frozen node) or holds
the interpreter in a C call, so the watching happens in another process. Under a launcher (torchrun,
srun, mpirun) `kumihimo train` becomes the supervisor of its rank (`supervise`): it starts the trainer
as its child, forwards the stop signals (SIGTERM, SIGUSR1) to it, and reads the heartbeat file the child
rewrites at each phase (step, evaluation, save) with the phase's limit. When a phase runs past its
limit, the supervisor

1. takes the child's Python stacks (faulthandler, registered on SIGUSR2; a stopped process is sent
   SIGCONT after the signal so that the handler runs),
2. logs one line (logger kumihimo.watchdog, on every rank, since the rank that hangs is rarely 0)
   naming the rank, its host and what it is doing: *stuck* when its main thread is not
   inside a collective (or the process is stopped), *waiting in a collective* otherwise (it waits for
   a stuck peer; its supervisor gives that peer's `GRACE_SECONDS` to report first),
3. kills the child (SIGKILL) and exits with `EXIT_HUNG`, which the batch scripts requeue like
   `EXIT_REQUEUE`; the next allocation resumes from the newest checkpoint.

Limits (`PhaseLimits`) are nvidia-resiliency-ext's idea of calculated timeouts: before a kind of phase
has been seen to finish, `resilience.hang_initial_timeout_s`; after, `hang_timeout_factor` x the
longest one seen, and never less than `hang_timeout_floor_s`. Setup (building datasets, loading a
checkpoint) is not watched here: `runtime.distributed_timeout_minutes` covers its collectives.

This module imports no torch: the supervisor stays a small process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kumihimo.core.logs import stage_logger
from kumihimo.core.processes import die_with_parent

log = stage_logger("watchdog")

EXIT_HUNG = 5
"""Exit code of a rank ended by its watchdog (its own hang or a peer's); the batch scripts requeue it."""
HEARTBEAT_ENV = "KUMIHIMO_HEARTBEAT_DIR"
"""Set by the supervisor for its trainer: the folder of the heartbeat file and the stack dump."""
POLL_SECONDS = 0.5
"""How often the supervisor reads the heartbeat."""
GRACE_SECONDS = 5.0
"""How long a rank that waits in a collective stays up past its limit, so that the stuck rank's
supervisor (whose limit ends at about the same time) names it first."""
STACK_SIGNAL = signal.SIGUSR2
_BEAT, _STACKS = "beat.json", "stacks.txt"
# The outermost frame of a main thread started by `python -m` or `python -c`.
_BOTTOM = re.compile(r"line \d+ in (_run_module_as_main|<module>)\s*$")
# Frames of these files mean the main thread is inside communication with other ranks.
_COLLECTIVE_FILES = re.compile(
    r"torch/distributed/|megatron/core/distributed/|megatron/core/pipeline_parallel/p2p_communication"
)


@dataclass(frozen=True)
class Beat:
    """What one rank is doing, as its heartbeat file says."""

    rank: int
    host: str
    pid: int
    step: int
    phase: str
    started: float
    """time.time() when the phase began."""
    limit: float | None
    """Seconds the phase may take; None: not watched."""
    basis: str
    """How the limit was chosen, for the report."""

    def doing(self) -> str:
        return f"step {self.step}" if self.phase == "step" else f"the {self.phase} at step {self.step}"

    def overdue(self, now: float) -> float | None:
        """Seconds the phase has run when past its limit, else None."""
        elapsed = now - self.started
        return elapsed if self.limit is not None and elapsed > self.limit else None


class PhaseLimits:
    """Limit per kind of phase: the initial limit until one has finished, then factor x the longest
    seen, at least the floor."""

    def __init__(self, factor: float, floor_s: float, initial_s: float):
        self.factor, self.floor_s, self.initial_s = factor, floor_s, initial_s
        self.longest: dict[str, float] = {}

    def record(self, phase: str, seconds: float) -> None:
        self.longest[phase] = max(seconds, self.longest.get(phase, 0.0))

    def limit(self, phase: str) -> tuple[float, str]:
        seen = self.longest.get(phase)
        if seen is None:
            return self.initial_s, f"first {phase}: resilience.hang_initial_timeout_s"
        learned = self.factor * seen
        if learned < self.floor_s:
            return self.floor_s, f"resilience.hang_timeout_floor_s; longest {phase} so far {seen:.2f} s"
        return learned, f"{self.factor:g} x the longest {phase} so far, {seen:.2f} s"


class Heartbeat:
    """The trainer's side: `begin(phase, step)` at each phase; a no-op unless a supervisor watches."""

    def __init__(self, folder: Path | None, limits: PhaseLimits | None, rank: int = 0):
        self.folder, self.limits, self.rank = folder, limits, rank
        self._phase: tuple[str, float] | None = None
        self._stacks = None
        if folder is not None:
            # faulthandler writes from its C signal handler: it works while Python is stuck in C code
            self._stacks = open(folder / _STACKS, "w")  # noqa: SIM115 - open for the life of the process
            faulthandler.register(STACK_SIGNAL, file=self._stacks, all_threads=True)

    @classmethod
    def from_env(cls, factor: float | None, floor_s: float, initial_s: float, rank: int) -> Heartbeat:
        folder = os.environ.get(HEARTBEAT_ENV)
        if not folder or factor is None:
            return cls(None, None)
        return cls(Path(folder), PhaseLimits(factor, floor_s, initial_s), rank)

    def begin(self, phase: str, step: int) -> None:
        """The previous phase ended (its length is learned); `phase` of `step` starts now."""
        if self.folder is None:
            return
        now = time.time()
        if self._phase is not None:
            self.limits.record(self._phase[0], now - self._phase[1])
        self._phase = (phase, now)
        limit, basis = self.limits.limit(phase)
        self._write(Beat(self.rank, host_name(), os.getpid(), step, phase, now, limit, basis))

    def idle(self, step: int) -> None:
        """Nothing watched from now on (training has ended)."""
        if self.folder is None:
            return
        self._phase = None
        self._write(Beat(self.rank, host_name(), os.getpid(), step, "finish", time.time(), None, ""))

    def _write(self, beat: Beat) -> None:
        temporary = self.folder / f".{_BEAT}.tmp"
        temporary.write_text(json.dumps(asdict(beat)))
        os.replace(temporary, self.folder / _BEAT)


def host_name() -> str:
    """This node's name as the batch system knows it (the name to drain), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def read_beat(folder: Path) -> Beat | None:
    try:
        return Beat(**json.loads((folder / _BEAT).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


# ---------------------------------------------------------------- the supervisor
def supervise(command: list[str]) -> int:
    """Run `command` (a trainer: `python -m kumihimo.cli train ...`) as a child watched through its
    heartbeat; its exit code, or EXIT_HUNG."""
    folder = Path(tempfile.mkdtemp(prefix="kumihimo-heartbeat-"))
    me = os.getpid()
    child = subprocess.Popen(
        command,
        env=dict(os.environ, **{HEARTBEAT_ENV: str(folder)}),
        preexec_fn=lambda: die_with_parent(me),
    )
    forward = _Forwarder(child)
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = child.wait(timeout=POLL_SECONDS)
                return _after_exit(code, read_beat(folder))
            beat = read_beat(folder)
            if beat is not None and beat.overdue(time.time()) is not None:
                forward.enabled = False  # from here the supervisor ends the child itself
                if _handle_hang(child, beat, folder):
                    return EXIT_HUNG
                forward.enabled = True
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        forward.restore()
        shutil.rmtree(folder, ignore_errors=True)


class _Forwarder:
    """Pass SIGTERM and SIGUSR1 on to the child (Slurm may signal only the task's first process);
    SIGINT reaches the child from the terminal itself."""

    def __init__(self, child: subprocess.Popen):
        self.child, self.enabled = child, True
        self._previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _forward(self, signum, frame) -> None:
        if self.enabled and self.child.poll() is None:
            self.child.send_signal(signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _after_exit(code: int, beat: Beat | None) -> int:
    """The child's exit code, except that a crash while it had waited past half its limit (a peer's
    supervisor ended that peer, and the collective failed) is reported as the hang it follows."""
    if code in (0, 2, 3, 4) or beat is None or beat.limit is None:
        return code if code >= 0 else 128 - code
    elapsed = time.time() - beat.started
    if elapsed > 0.5 * beat.limit:
        _say(
            f"rank {beat.rank} on {beat.host} failed (exit {code}) in {beat.doing()} "
            f"after {elapsed:.1f} s of its {beat.limit:.1f} s limit, as a peer was ended for a hang; "
            f"exiting {EXIT_HUNG} for requeue"
        )
        return EXIT_HUNG
    return code if code >= 0 else 128 - code


def _handle_hang(child: subprocess.Popen, beat: Beat, folder: Path) -> bool:
    """Report and end a child past its limit; False when it moved on during the grace period."""
    stopped = process_state(child.pid) in ("T", "t")
    stacks = dump_stacks(child.pid, folder, stopped)
    where = main_thread_frames(stacks)
    waiting = not stopped and waits_in_collective(where)
    if not stopped:
        # A rank waiting for a stuck peer stays up GRACE_SECONDS, so that the peer's supervisor names it
        # first; any other rank a second, in case it is already ending because a peer was ended (its
        # stack then shows the error being handled, not the hang).
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = child.wait(timeout=GRACE_SECONDS if waiting else 1.0)
            _say(
                f"rank {beat.rank} on {beat.host} failed (exit {code}) in {beat.doing()} as a peer was "
                f"ended for a hang; exiting {EXIT_HUNG} for requeue"
            )
            return True
        now_beat = read_beat(folder)
        if now_beat is not None and now_beat.started != beat.started:
            _say(f"rank {beat.rank} on {beat.host} moved on to {now_beat.doing()}")
            return False
    elapsed = time.time() - beat.started
    doing = f"{beat.doing()} has run {elapsed:.1f} s, over its limit of {beat.limit:.1f} s ({beat.basis})"
    ending = f"ending it (exit {EXIT_HUNG}: requeue and resume from the newest checkpoint)"
    innermost = where[0] if where else "no Python stack could be taken"
    if waiting:
        _say(
            f"rank {beat.rank} on {beat.host} (pid {beat.pid}) waits in a collective: {doing}; at {innermost}; "
            f"another rank is stuck (see its watchdog line); {ending}"
        )
    else:
        state = "the process is stopped (SIGSTOP or a frozen node)" if stopped else f"at {innermost}"
        _say(f"rank {beat.rank} on {beat.host} (pid {beat.pid}) is stuck: {doing}; {state}; {ending}")
        _say(f"Python stacks of rank {beat.rank} (pid {beat.pid}):\n{stacks}")
    child.kill()
    child.wait()
    return True


def _say(line: str) -> None:
    """A line of the supervisor, from every rank's supervisor (the one that names its rank)."""
    log.error(line, extra={"all_ranks": True})


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat (R, S, D, T stopped, Z); '?' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[0]


def dump_stacks(pid: int, folder: Path, stopped: bool, wait_s: float = 5.0) -> str:
    """The Python stacks of every thread of `pid` (faulthandler's dump on STACK_SIGNAL).

    A stopped process is continued for the dump and stopped again as soon as the dump is written (a
    few milliseconds): a SIGSTOP sent along with the SIGCONT would stop it before its handler ran. The
    signal goes to the main thread itself (signal_main_thread), which handles it on waking, before it
    runs on: sent to the process, any thread may take it, and the main thread's frames would be read
    while it runs past the point where it was stopped."""
    path = folder / _STACKS
    before = path.stat().st_size if path.exists() else 0
    try:
        signal_main_thread(pid, STACK_SIGNAL)
        if stopped:
            os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        return ""
    deadline, size, still = time.monotonic() + wait_s, before, 0
    while time.monotonic() < deadline:
        time.sleep(0.01)
        now = path.stat().st_size if path.exists() else 0
        still = still + 1 if now == size and now > before else 0
        size = now
        # done when the main thread's stack (dumped last) has reached its outermost frame; a loaded
        # machine can pause the writer for a while between two threads, so no shorter pause counts
        if still >= 3 and _BOTTOM.search(_read_from(path, before)):
            break
    if stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    return _read_from(path, before).rstrip()


def signal_main_thread(pid: int, signum: int) -> None:
    """Send `signum` to the main thread of process `pid` (whose thread id is the pid) with tgkill(2);
    os.kill where the C library has no tgkill (glibc before 2.30, other systems)."""
    try:
        tgkill = ctypes.CDLL(None, use_errno=True).tgkill
    except (OSError, AttributeError):
        os.kill(pid, signum)
        return
    if tgkill(ctypes.c_int(pid), ctypes.c_int(pid), ctypes.c_int(int(signum))) != 0:
        code = ctypes.get_errno()
        if code == errno.ESRCH:
            raise ProcessLookupError(code, os.strerror(code), pid)
        raise OSError(code, os.strerror(code))


def _read_from(path: Path, offset: int) -> str:
    with open(path, encoding="utf-8", errors="replace") as stream:
        stream.seek(offset)
        return stream.read()


def main_thread_frames(stacks: str) -> list[str]:
    """The frames ('file:line in function', innermost first) of the thread running the training loop."""
    blocks = re.split(r"\n\s*\n", stacks)
    # the training loop's thread, else the thread that handled the signal (the main one, in CPython)
    chosen = [b for b in blocks if "pretrain/training.py" in b] or [
        b for b in blocks if "Current thread" in b
    ]
    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', chosen[0]) if chosen else []
    return [f"{path}:{line} in {function}" for path, line, function in frames]


def waits_in_collective(frames: list[str]) -> bool:
    """Whether the innermost frames, down to the first of this project, are communication."""
    for frame in frames:
        if _COLLECTIVE_FILES.search(frame):
            return True
        if "/pretrain/" in frame or "/kumihimo/" in frame:
            return False
    return False

"""Detection time of a SIGSTOPped rank: kumihimo's watchdog against nvidia-resiliency-ext's ft_launcher.

The same toy job runs under both: 2 gloo ranks, each step 0.2 s of "compute" (a sleep) and one
all_reduce; rank 1 stops itself with SIGSTOP at step 10. Each side is given the same fixed limit
(5 s after the last step began): kumihimo's PhaseLimits with floor 5 s, factor 1.01 (so the floor
governs), and ft_launcher's rank_heartbeat_timeout=5 with a heartbeat at each step start. Reported:
seconds from the stop to the launcher's exit, its exit code, and whether the stuck rank was named.

    python benchmarks/bench_hang_detection.py [--nvrx /path/to/pip --target folder]

nvidia-resiliency-ext is not a dependency: install it into a separate folder
(`pip install --no-deps --target /tmp/nvrx nvidia-resiliency-ext`) and pass --nvrx /tmp/nvrx.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STOP_STEP, STEP_SECONDS, LIMIT = 10, 0.2, 5.0


def worker(mode: str, stamp: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if mode == "nvrx":
        from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient

        client = RankMonitorClient()
        client.init_workload_monitoring()
        beat = lambda step: client.send_heartbeat()  # noqa: E731
    else:
        from kumihimo.pretrain.watchdog import Heartbeat, PhaseLimits

        heartbeat = Heartbeat(
            Path(os.environ["KUMIHIMO_HEARTBEAT_DIR"]), PhaseLimits(1.01, LIMIT, 60.0), rank
        )
        beat = lambda step: heartbeat.begin("step", step)  # noqa: E731
    for step in range(1, 1000):
        beat(step)
        if rank == 1 and step == STOP_STEP:
            Path(stamp).write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        time.sleep(STEP_SECONDS)
        dist.all_reduce(torch.ones(4))


def launch(mode: str, nvrx: str | None) -> dict:
    stamp = tempfile.mktemp(prefix="bench-hang-")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.update(BENCH_HANG_WORKER=mode, BENCH_HANG_STAMP=stamp)  # not argv: ft_launcher would parse it
    this = [sys.executable, __file__]
    rendezvous = ["--nproc-per-node=2", "--nnodes=1", "--master-port=29731"]
    if mode == "nvrx":
        env["PYTHONPATH"] = f"{nvrx}:{env.get('PYTHONPATH', '')}"
        command = [
            sys.executable,
            "-c",
            "import sys; from nvidia_resiliency_ext.fault_tolerance.launcher import main; sys.exit(main())",
            *rendezvous,
            "--ft-param-initial_rank_heartbeat_timeout=60",
            f"--ft-param-rank_heartbeat_timeout={LIMIT}",
            "--ft-param-workload_check_interval=1",
            "--no-python",
            *this,
        ]
    else:
        supervised = (
            "import sys; from kumihimo.pretrain.watchdog import supervise; sys.exit(supervise(sys.argv[1:]))"
        )
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *rendezvous,
            "--no-python",
            sys.executable,
            "-c",
            supervised,
            *this,
        ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    ended = time.time()
    stopped = float(Path(stamp).read_text()) if Path(stamp).exists() else None
    Path(stamp).unlink(missing_ok=True)
    named = re.findall(r".*(?:is stuck|timeout elapsed|[Tt]erminat|[Hh]ang detected).*", proc.stderr)
    return {
        "mode": mode,
        "exit": proc.returncode,
        "detected_after_s": None if stopped is None else round(ended - stopped, 1),
        "report": [line[:300] for line in named[:4]] if named else proc.stderr[-600:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvrx", help="folder nvidia-resiliency-ext was pip-installed into (--target)")
    if os.environ.get("BENCH_HANG_WORKER"):
        worker(os.environ["BENCH_HANG_WORKER"], os.environ["BENCH_HANG_STAMP"])
        return
    args = parser.parse_args()
    for mode in ["kumihimo"] + (["nvrx"] if args.nvrx else []):
        print(launch(mode, args.nvrx), flush=True)


if __name__ == "__main__":
    main()

"""Issue 23.6a: `kumihimo train --nproc-per-node 2` killed with SIGKILL left torchrun and both ranks
running (parented to PID 1, still training and writing checkpoints). Everything the launch starts must
die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_kill_9_of_the_launcher_ends_torchrun_and_every_rank(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kumihimo.cli",
            "train",
            "configs/pretrain/tiny-cpu.yaml",
            "--nproc-per-node",
            "2",
        ]
        + ["data.mock=true", "schedule.train_iters=100000", f"output_dir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(launcher.pid)
    started = []
    try:
        deadline = time.monotonic() + 240
        while True:  # wait for torchrun (the launcher's child) and both ranks (torchrun's children)
            started = parent.children(recursive=True)
            torchrun = parent.children()
            ranks = [p for t in torchrun for p in t.children() if "kumihimo.cli" in " ".join(p.cmdline())]
            if len(ranks) == 2:
                break
            assert launcher.poll() is None and time.monotonic() < deadline, "the launch never started 2 ranks"
            time.sleep(0.2)
        time.sleep(2)  # the ranks are past their first lines
        started = parent.children(recursive=True)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        _, alive = psutil.wait_procs(started, timeout=15)
        assert alive == [], f"processes of the launch outlived it: {[p.cmdline()[:4] for p in alive]}"
    finally:
        for process in [parent, *started]:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.slow
def test_a_port_taken_by_another_program_does_not_fail_a_local_launch(tmp_path, monkeypatch):
    """`--nproc-per-node` launches rendezvous on a port that torchrun's store binds itself: a port
    found free beforehand and bound later could be taken in between (seen as EADDRINUSE when two
    launches ran at once). Here a port is held busy and offered as the free one; the launch still runs."""
    import socket

    from kumihimo.pretrain import cli, distributed

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        monkeypatch.setattr(distributed, "free_port", lambda: busy.getsockname()[1])
        monkeypatch.chdir(REPO)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        args = ["train", "configs/pretrain/tiny-cpu.yaml", "data.mock=true", "schedule.train_iters=2"]
        args.append("schedule.lr_warmup_iters=1")
        code = cli.spawn_local(2, [*args, "checkpoint.enabled=false", f"output_dir={tmp_path / 'run'}"])
    assert code == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()

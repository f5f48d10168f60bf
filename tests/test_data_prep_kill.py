"""A killed data_prep run (issue 12, items 4 and 7): no orphans, one live run per output_dir, debris
cleaned by the next run, and one-line errors for an output_dir that cannot be written.

`kill -9` used to leave the pool workers alive (re-parented to PID 1), still writing shards into the
output, and an immediate re-run raced them and crashed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kumihimo.cli import main
from kumihimo.core import configtree
from kumihimo.core.files import TEMP_MARK
from kumihimo.core.processes import RunLock
from tests.conftest import REPO
from tests.test_data_prep_pipeline import JA, write_corpus


def write_recipe(root: Path, num_files: int = 1, num_workers: int = 1) -> tuple[Path, Path]:
    """(recipe path, output_dir) of the pipeline tests' corpus plus `num_files` more Japanese files."""
    config = write_corpus(root)
    for index in range(num_files):
        lines = [
            json.dumps(
                {"id": f"x{index}-{n}", "text": f"{n}番目の文書です。\n" + JA[n % 4]},
                ensure_ascii=False,
            )
            for n in range(40)
        ]
        (root / f"ja_more{index:03d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config.num_workers = num_workers
    recipe = root / "recipe.yaml"
    configtree.save(config, recipe)
    return recipe, Path(config.output_dir)


def curate_cli(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "kumihimo.cli", "data", "curate", str(recipe), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def debris(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if TEMP_MARK in p.name)


@pytest.mark.slow
def test_kill_9_leaves_no_worker_and_the_rerun_finishes(tmp_path):
    recipe, out = write_recipe(tmp_path / "corpus", num_files=60, num_workers=2)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.Popen(
        [sys.executable, "-m", "kumihimo.cli", "data", "curate", str(recipe)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parent = psutil.Process(run.pid)
    shards = out / "work" / "shards"
    deadline = time.monotonic() + 120
    # kill once the workers are curating: some shards done, more to go
    while not (shards.is_dir() and len([p for p in shards.iterdir() if TEMP_MARK not in p.name]) >= 2):
        assert run.poll() is None and time.monotonic() < deadline, "curate finished or never started"
        time.sleep(0.02)
    workers = parent.children(recursive=True)  # the pool's two workers and multiprocessing's tracker
    assert sum("spawn_main" in " ".join(p.cmdline()) for p in workers) == 2, workers
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], f"workers outlived the killed run: {alive}"
    assert (out / RunLock.NAME).is_file(), "the killed run's lock stays, naming it"

    again = curate_cli(recipe)
    assert again.returncode == 0, again.stderr
    assert "a previous run was killed" in again.stderr
    assert debris(out) == [] and not (out / RunLock.NAME).exists()
    assert "resuming:" in again.stderr and (out / "report.json").is_file()  # kept the killed run's shards


def test_a_live_run_is_refused_and_a_killed_runs_debris_removed(tmp_path, capsys):
    recipe, out = write_recipe(tmp_path / "corpus")
    with RunLock(out, "curate"):  # this process plays the live run
        assert main(["data", "curate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another kumihimo run (curate, pid {os.getpid()} on {socket.gethostname()}" in err
    assert err.count("\n") == 1

    # what a killed run leaves: its lock (a pid that no longer runs), partial writes of every writer
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = {"pid": dead.pid, "host": socket.gethostname(), "started": 1.0, "since": "earlier"}
    (out / RunLock.NAME).write_text(json.dumps(lock))
    left = [
        "curated/.ja.jsonl.tmp-kumihimo-k2j4h5g6",
        "datasets/ja_text_document.bin.tmp-kumihimo-4242",
        "work/shards/.ja-00000.tmp-kumihimo-4242/candidates.jsonl",
        ".report.json.tmp-kumihimo-zz9y8x7w",
        "notes/.draft.tmp-kumihimo-1",  # not a folder data_prep writes: kept
    ]
    for name in left:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("partial")
    assert main(["data", "curate", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert f"a previous run was killed (pid {dead.pid} since earlier); removed 4" in err
    assert debris(out) == ["notes/.draft.tmp-kumihimo-1"]


# Names a user may well give their own files: none is kumihimo's, whatever folder it lies in.
USER_NAMES = [
    "notes.tmp-1",
    ".report.json.tmp-zz9y8x7w",
    ".all.jsonl.bak_1234",
    "curated/.mine.jsonl.bak_2024",
]


def test_user_files_that_look_temporary_are_never_removed(tmp_path, capsys):
    """Issue 23.2: curate removed user files named like its old temporary files (`*.tmp-*`, hidden
    `*.bak_*`) and said "a previous run was killed"; an input living in output_dir was deleted
    before it was read."""
    recipe, out = write_recipe(tmp_path / "corpus")
    for name in USER_NAMES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("mine")
    # an input that lives in output_dir under a name like a temporary file
    own_input = out / "extra.tmp-5.jsonl"
    own_input.write_text(
        json.dumps({"id": "own", "text": "自分の入力です。" + JA[2]}, ensure_ascii=False) + "\n"
    )
    text = recipe.read_text(encoding="utf-8")
    recipe.write_text(text.replace("paths:\n", f"paths:\n    - {own_input}\n", 1), encoding="utf-8")
    assert main(["data", "curate", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "previous run" not in err, err
    for name in USER_NAMES:
        assert (out / name).read_text() == "mine", name
    assert own_input.is_file()
    assert "自分の入力です" in (out / "curated" / "ja.jsonl").read_text(encoding="utf-8")


def test_a_lock_from_another_host_is_not_taken_over(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / RunLock.NAME).write_text(json.dumps({"pid": 1, "host": "other-node", "since": "today"}))
    with pytest.raises(Exception, match="pid 1 on other-node since today.*delete .*kumihimo.lock"):
        with RunLock(out, "curate"):
            pass


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable", "file-datatrove"])
def test_output_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, kind):
    recipe, _ = write_recipe(tmp_path / "corpus")
    (tmp_path / "a-file").write_text("x")
    if kind == "unwritable":
        if os.geteuid() == 0:  # root writes anywhere a mode allows nothing; /sys refuses even root
            target, reason = "/sys/kumihimo-out", "Operation not permitted"
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            target, reason = str(tmp_path / "ro" / "out"), "Permission denied"
    else:
        target = str(tmp_path / "a-file") if kind != "under_a_file" else str(tmp_path / "a-file" / "out")
        reason = "is a file" if kind != "under_a_file" else "a part of the path is a file"
    executor = ["executor.kind=datatrove-local"] if kind.endswith("datatrove") else []
    assert main(["data", "curate", str(recipe), f"output_dir={target}", *executor]) == 2
    err = capsys.readouterr().err
    assert f"output_dir={target!r}" in err and reason in err and err.count("\n") == 1, err


@pytest.mark.parametrize("kind", ["file", "under_a_file", "unwritable"])
def test_tokenizer_output_dir_that_cannot_be_written_is_one_line_before_sampling(tmp_path, capsys, kind):
    import yaml

    from kumihimo.tokenizer import synthetic
    from tests.test_tokenizer_train import recipe

    for lang in ("ja", "en", "code"):
        synthetic.write_jsonl(tmp_path / f"{lang}.jsonl", lang, 20)
    (tmp_path / "a-file").write_text("x")
    if kind == "unwritable":
        if os.geteuid() == 0:
            target, reason = "/sys/kumihimo-tok", "Operation not permitted"
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            target, reason = str(tmp_path / "ro" / "tok"), "Permission denied"
    else:
        target = str(tmp_path / "a-file") if kind == "file" else str(tmp_path / "a-file" / "tok")
        reason = "is a file" if kind == "file" else "a part of the path is a file"
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(recipe(tmp_path, Path(target))))
    assert main(["tokenizer", "train", str(tmp_path / "tok.yaml")]) == 2
    err = capsys.readouterr().err  # after the resolved recipe, before any sampling
    errors = [line for line in err.splitlines() if line.startswith("kumihimo: error:")]
    assert len(errors) == 1 and f"output_dir={target!r}" in errors[0] and reason in errors[0], err
    assert "[tokenizer] ja:" not in err


def test_a_full_disk_is_one_line_and_the_rerun_finishes(tmp_path, small_disk):
    """Issue 23.7: curate on a full disk ended in an OSError traceback. A full disk is one line (exit 2)
    naming the file, nothing half-written is published, and the same command finishes once there is
    room."""
    recipe, _ = write_recipe(tmp_path, num_files=6)
    disk = small_disk(96 * 1024)
    out = disk / "out"
    full = curate_cli(recipe, f"output_dir={out}")
    assert full.returncode == 2, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("kumihimo: error: disk full ") and "rerun the same command" in last, last
    assert "Traceback" not in full.stderr
    assert not (out / "blend.yaml").exists() and not (out / "report.json").exists()
    subprocess.run(["umount", str(disk)], check=True)  # room again: the same folder, now on the big disk
    again = curate_cli(recipe, f"output_dir={out}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert debris(out) == []

"""Nothing hangs in silence before the first step (issue 30, point 1).

A blend with a small source and a split that leaves one of its splits without documents made Megatron's
GPTDataset._get_num_epochs loop forever, and SIGTERM did not end it. Such splits are refused in one line
before Megatron builds anything; the index build says when it starts and ends; and SIGTERM before the
first step ends the process promptly, even inside Megatron's C++ index helpers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kumihimo.core.errors import UserError
from kumihimo.data_prep.indexed import IndexedDatasetWriter
from kumihimo.pretrain.data_inspection import check_splits, split_document_counts
from tests.conftest import REPO, run_cli

SMALL_DOCS = 12  # the quickstart's `web` source has 12 documents


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset prefix of 12 documents, tokenizer)."""
    from tests.test_convert_to_hf import train_spm

    work = tmp_path_factory.mktemp("setup_stop")
    rng = np.random.default_rng(0)
    lengths = rng.integers(40, 200, SMALL_DOCS)
    writer = IndexedDatasetWriter(work / "web", vocab_size=1000)
    writer.add_documents(rng.integers(4, 1000, int(lengths.sum())), lengths)
    writer.finish()
    return work / "web", train_spm(work / "tok", seed=1)


def train_args(prefix: Path, tokenizer: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        "train",
        "tiny-cpu",
        f"data.blend=[{{prefix: {prefix}, weight: 1.0}}]",
        "data.mock=false",
        f"data.tokenizer={tokenizer}",
        f"output_dir={run_dir}",
        "schedule.lr_warmup_iters=1",
        *overrides,
    ]


@pytest.mark.parametrize("split", ["98,2,0", "969,30,1", "90,10,0", "1,1,1", "100,0,0", "3,0,1"])
@pytest.mark.parametrize("num_documents", [1, 2, 3, 12, 100, 1001])
def test_split_document_counts_are_megatrons(split, num_documents):
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    megatron = [
        0 if b is None else int(round(b[1] * num_documents)) - int(round(b[0] * num_documents))
        for b in matrix
    ]
    assert split_document_counts(num_documents, split) == megatron


def test_suggested_split_gives_every_weighted_split_a_document():
    with pytest.raises(UserError) as refused:
        check_splits(["/d/web_text_document", "/d/big_text_document"], [12, 5000], "969,30,1")
    message = str(refused.value)
    assert "web (/d/web_text_document, 12 documents) 12 train / 0 validation / 0 test" in message
    suggested = message.split("data.split=")[-1].split(",", 3)
    suggested = ",".join(suggested[:3]).rstrip(",")
    counts = split_document_counts(12, suggested)
    assert all(c > 0 for c in counts), (suggested, counts)
    check_splits(["/d/web_text_document", "/d/big_text_document"], [12, 5000], suggested)


def test_empty_validation_split_is_refused_in_one_line_before_any_process(small_source, tmp_path):
    """The hang of issue 30: 12 documents and data.split=98,2,0 (what from-hf's run_config.yaml says)."""
    prefix, tokenizer = small_source
    proc = run_cli(
        *train_args(prefix, tokenizer, tmp_path / "run", "data.split=98,2,0"), "--check", timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"web ({prefix}, 12 documents) 12 train / 0 validation / 0 test documents" in lines[0]
    assert "validation split would be empty" in lines[0] and "data.split=95,5,0" in lines[0]


@pytest.mark.slow
def test_sigterm_while_indices_are_built_ends_the_run_promptly(small_source, tmp_path):
    """A real SIGTERM once the index build has started (a long one: 3 million steps on 12 documents,
    mostly inside Megatron's C++ helpers): exit 3 within the grace period, nothing left running."""
    prefix, tokenizer = small_source
    args = train_args(
        prefix, tokenizer, tmp_path / "run", "data.split=90,10,0", "schedule.train_iters=3000000"
    )
    code, _, rest, took = sigterm_after(args, "[train] dataset indices: building", settle_s=1)
    assert code == 3, rest[-2000:]
    assert took < 30, took
    assert "[train] SIGTERM before the first step: exiting (nothing trained, nothing to save)" in rest
    assert "Traceback" not in rest


@pytest.mark.slow  # two processes under torchrun
def test_user_error_in_spawned_ranks_is_one_line_once_with_exit_2(tmp_path, capfd):
    """Under --nproc-per-node the ranks' one-line error was printed once per rank, glued together and
    buried under torchrun's ChildFailedError traceback, exit 1 (issue 30, point 6)."""
    from kumihimo.pretrain.cli import spawn_local

    missing = tmp_path / "missing.yaml"  # fails in each rank as it loads the config
    with pytest.raises(UserError) as refused:
        spawn_local(2, ["train", str(missing)])
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and str(missing) in message
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "ChildFailedError" not in err and "kumihimo: error" not in err, err
    assert "kumihimo: error" not in out


def test_check_of_a_multi_process_recipe_needs_no_nproc_per_node():
    """`train <TP=2 recipe> --check` failed on world size 1 unless --nproc-per-node was given."""
    proc = run_cli("train", "tiny-cpu", "parallelism.tensor_model_parallel_size=2", "--check", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config OK: world=2: TP=2" in proc.stdout
    proc = run_cli(
        "train", "tiny-cpu", "parallelism.tensor_model_parallel_size=2", "--check", "--nproc-per-node", "3"
    )
    assert proc.returncode == 2 and "world size 3 is not divisible" in proc.stderr


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.slow
def test_sigterm_during_a_hung_checkpoint_load_ends_the_run_and_writes_nothing(tmp_path):
    """A checkpoint load that never ends (its shard a FIFO nobody writes: a hung network file system) is
    announced with its size, and SIGTERM ends it: exit 3, no traceback, the checkpoint folder unchanged."""
    run = [
        "train",
        "tiny-cpu",
        f"output_dir={tmp_path}",
        f"checkpoint.dir={tmp_path}/ckpt",
        "checkpoint.save_interval=2",
        "schedule.lr_warmup_iters=1",
        "schedule.train_iters=4",
    ]
    proc = run_cli(*run, "schedule.exit_after_iters=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = sorted((tmp_path / "ckpt" / "iter_0000002").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shards[-1].unlink()
    os.mkfifo(shards[-1])
    before = _tree(tmp_path / "ckpt")
    # 2 s after the announcement is well inside the load: it cannot finish
    code, announced, rest, took = sigterm_after(run, "[train] loading checkpoint", settle_s=2)
    assert " GB)" in announced, announced
    assert code == 3, rest[-2000:]
    assert took < 30, took
    assert "[train] SIGTERM before the first step: exiting (nothing trained, nothing to save)" in rest
    assert "Traceback" not in rest and "resumed from" not in rest
    assert _tree(tmp_path / "ckpt") == before


def sigterm_after(args: list[str], marker: str, settle_s: float) -> tuple[int, str, str, float]:
    """Run `kumihimo ARGS`, send it SIGTERM `settle_s` after it printed a line containing `marker`, and
    return (exit code, that line, the rest of its stderr, seconds from the signal to the exit). A run
    that never prints the marker is killed after 180 s instead of hanging the test."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    child = subprocess.Popen(
        [sys.executable, "-m", "kumihimo.cli", *args], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(180, child.kill)
    watchdog.start()
    try:
        seen = []
        for line in child.stderr:
            seen.append(line)
            if marker in line:
                break
        assert child.poll() is None, "".join(seen[-20:])
        time.sleep(settle_s)
        assert child.poll() is None, "".join(seen[-20:])
        sent = time.monotonic()
        child.send_signal(signal.SIGTERM)
        rest = child.stderr.read()
        child.wait(timeout=60)
        return child.returncode, seen[-1], rest, time.monotonic() - sent
    finally:
        watchdog.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()

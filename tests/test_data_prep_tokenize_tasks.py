"""`data tokenize` as N tasks (issue 25, point 3): parts per task, then a merge whose .bin/.idx, markers,
blend.yaml and report equal the single-process run's byte for byte; resume per task after a SIGKILL; the
merge equals Megatron-LM's IndexedDatasetBuilder.add_index over the same parts."""

from __future__ import annotations

import dataclasses
import errno
import filecmp
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_data_prep_buckets import scored_run
from test_data_prep_pipeline import train_tiny_spm, write_corpus

from kumihimo.core.configtree import ConfigError
from kumihimo.core.errors import UserError
from kumihimo.core.files import TEMP_MARK
from kumihimo.data_prep import tokenize_parts
from kumihimo.data_prep.config import DataPrepConfig, ScoreBucketsConfig, load_config
from kumihimo.data_prep.pipeline import curate
from kumihimo.data_prep.tokenize_parts import (
    merge_parts,
    parts_root,
    plan_spans,
    prepare_parts,
    tokenize,
    tokenize_task,
)
from kumihimo.data_prep.tokenize_stage import build_datasets, checked_settings
from tests.conftest import REPO

# the curated test files are 3-12 KB: several parts per source, and lines longer than a part
PART_BYTES = 700


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tiny_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_path) -> dict[str, DataPrepConfig]:
    """The single-process runs: the pipeline tests' corpus curated, and a scored corpus tokenized into
    score buckets (one bucket left out, so parts hold different groups and documents are left out)."""
    root = tmp_path_factory.mktemp("reference")
    curated = write_corpus(root / "corpus")
    curate(curated)
    bucketed = scored_run(root / "bucketed")
    bucketed.tokenize.buckets = [
        ScoreBucketsConfig(source="ja", score="edu", edges=[0.3, 0.5, 0.8], multipliers=[0.0, 1.0, 2.0, 4.0])
    ]
    for config in (curated, bucketed):
        build_datasets(config, tokenizer_path)
    return {"curated": curated, "bucketed": bucketed}


def copy_of(reference: DataPrepConfig, out: Path, **tokenize) -> DataPrepConfig:
    """The reference's config writing to `out`, which holds a copy of its curated files (same bytes and
    mtimes, which the markers record) and of its report.json (whose tokens tokenize rewrites), nothing else."""
    (out / "curated").mkdir(parents=True)
    for source in reference.input.sources:
        shutil.copy2(Path(reference.output_dir, "curated", f"{source.name}.jsonl"), out / "curated")
    if Path(reference.output_dir, "report.json").is_file():
        shutil.copy2(Path(reference.output_dir, "report.json"), out)
    config = dataclasses.replace(reference, output_dir=str(out))
    config.tokenize = dataclasses.replace(reference.tokenize, part_bytes=PART_BYTES, **tokenize)
    return config


TOKENIZE_OUTPUTS = ("datasets/*", "work/tokenize/*.json", "blend.yaml", "report.*")


def outputs(out: Path, *roots: Path) -> dict[str, bytes]:
    """The files tokenize writes, with the output folders named in them written as ROOT."""
    found = {}
    for pattern in TOKENIZE_OUTPUTS:
        for path in out.glob(pattern):
            data = path.read_bytes()
            for root in roots:
                data = data.replace(str(root.resolve()).encode(), b"ROOT")
            found[str(path.relative_to(out))] = data
    return found


def assert_same_as(out: Path, reference: DataPrepConfig) -> None:
    theirs_root = Path(reference.output_dir)
    mine, theirs = outputs(out, out, theirs_root), outputs(theirs_root, theirs_root)
    assert sorted(mine) == sorted(theirs)
    assert [name for name in mine if mine[name] != theirs[name]] == []
    assert any(name.endswith(".bin") for name in mine) and "blend.yaml" in mine
    assert not parts_root(out).exists(), "the merge removes the parts"
    assert [p for p in out.rglob("*") if TEMP_MARK in p.name] == []


def test_parts_start_at_line_starts_and_cover_the_file(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        b"a" * 5 + b"\n",
        b"b" * 40 + b"\n",
        b"\n",
        b"c\n",
        b"d" * 9 + b"\n",
        b"e" * 3,
    ]  # no final newline
    path.write_bytes(b"".join(lines))
    starts = {sum(map(len, lines[:i])) for i in range(len(lines))}
    for part_bytes in (1, 4, 6, 7, 10, 47, 100):
        spans = plan_spans(path, part_bytes)
        assert spans[0][0] == 0 and spans[-1][1] == path.stat().st_size
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))
        assert {start for start, _ in spans} <= starts
    assert len(plan_spans(path, 6)) == 5  # the 41-byte line is one part; cuts inside it move past it
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert plan_spans(tmp_path / "empty.jsonl", 10) == [(0, 0)]  # the source still gets its empty dataset


@pytest.mark.parametrize("corpus", ["curated", "bucketed"])
@pytest.mark.parametrize("num_tasks", [1, 3, 8])
def test_n_tasks_equal_the_single_process_run_byte_for_byte(
    references, tokenizer_path, tmp_path, corpus, num_tasks
):
    reference = references[corpus]
    config = copy_of(reference, tmp_path / "out", tasks=num_tasks)
    config.num_workers = 1  # the tasks one after the other in this process
    out = Path(config.output_dir)
    checked, tokenizer = checked_settings(config, tokenizer_path)
    prepare_parts(checked, tokenizer)
    num_parts = len(tokenize_parts._planned_parts(checked))
    assert num_parts >= 4 if corpus == "curated" else num_parts >= 2
    tokenize(config, tokenizer_path)
    assert_same_as(out, reference)
    before = {p: p.stat().st_mtime_ns for p in (out / "datasets").iterdir()}
    tokenize(config, tokenizer_path)  # a second run finds every source done and rewrites nothing
    assert {p: p.stat().st_mtime_ns for p in (out / "datasets").iterdir()} == before
    assert_same_as(out, reference)


@pytest.mark.slow  # ~10 s on 2 cores: the pool's spawned processes import numpy and sentencepiece
def test_local_pool_and_datatrove_local_equal_the_single_process_run(references, tokenizer_path, tmp_path):
    reference = references["curated"]
    pool = copy_of(reference, tmp_path / "pool", tasks=3)
    pool.num_workers = 2  # three tasks on a pool of two processes
    tokenize(pool, tokenizer_path)
    assert_same_as(tmp_path / "pool", reference)
    pytest.importorskip("datatrove")
    local = copy_of(reference, tmp_path / "datatrove", tasks=3)
    local.executor = dataclasses.replace(reference.executor, kind="datatrove-local", workers=1)
    tokenize(local, tokenizer_path)
    assert_same_as(tmp_path / "datatrove", reference)
    assert len(list((tmp_path / "datatrove/work/datatrove/tokenize/logs").iterdir())) == 3


_CHILD = """
import pickle, sys, time
from pathlib import Path
from kumihimo.data_prep import tokenize_parts

config, tokenizer_path, ready = pickle.loads(Path(sys.argv[1]).read_bytes())
real, calls = tokenize_parts.encode_source, []

def encode_then_hang(*args, **kwargs):
    calls.append(1)
    real(*args, **kwargs)
    if len(calls) == 2:  # the second part's tokens are written, its files not renamed yet
        Path(ready).touch()
        time.sleep(600)

tokenize_parts.encode_source = encode_then_hang
tokenize_parts.tokenize_task(config, tokenizer_path, 1, 2)
"""


def test_a_killed_task_leaves_nothing_visible_and_the_rerun_redoes_only_its_parts(
    references, tokenizer_path, tmp_path, monkeypatch
):
    reference = references["curated"]
    config = copy_of(reference, tmp_path / "out", tasks=2)
    config.num_workers = 1
    out = Path(config.output_dir)
    checked, tokenizer = checked_settings(config, tokenizer_path)
    prepare_parts(checked, tokenizer)
    parts = tokenize_parts._planned_parts(checked)
    task_1 = parts[1::2]
    assert len(task_1) >= 3
    tokenize_task(checked, str(tokenizer_path), 0, 2)
    ready = tmp_path / "ready"
    (tmp_path / "args.pkl").write_bytes(pickle.dumps((checked, str(tokenizer_path), str(ready))))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path / "args.pkl")],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stderr.read().decode()
            assert time.monotonic() < deadline, "the task never reached its second part"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finished = {(s, i): parts_root(out) / s / f"{i:06d}" for s, i, _ in parts}
    done = {key: path.stat().st_ino for key, path in finished.items() if path.is_dir()}
    assert len(done) == len(parts) - len(task_1) + 1  # task 0's, and the first part of task 1
    debris = [p for p in parts_root(out).rglob("*") if TEMP_MARK in p.name]
    assert any(p.name.split(".bin")[0].endswith("_text_document") for p in debris)  # killed mid-write
    assert not (out / "datasets").exists()
    with pytest.raises(UserError, match=r"\d+ of \d+ parts of source ja are not tokenized yet"):
        merge_parts(checked, tokenizer_path)

    encoded = []
    real = tokenize_parts._encode_part
    monkeypatch.setattr(
        tokenize_parts,
        "_encode_part",
        lambda c, t, v, s, i, span: encoded.append((s, i)) or real(c, t, v, s, i, span),
    )
    tokenize(config, tokenizer_path)  # every task runs again; only task 1's unfinished parts are encoded
    assert sorted(encoded) == sorted((s, i) for s, i, _ in task_1 if (s, i) not in done)
    assert_same_as(out, reference)


@pytest.mark.slow  # importing megatron.core (torch) takes most of its ~40 s on 2 cores
def test_megatron_merge_of_the_parts_is_the_same_bytes(references, tokenizer_path, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    reference = references["bucketed"]
    config = copy_of(reference, tmp_path / "out", tasks=2)
    checked, tokenizer = checked_settings(config, tokenizer_path)
    prepare_parts(checked, tokenizer)
    for rank in range(2):
        tokenize_task(checked, str(tokenizer_path), rank, 2)
    compared = 0
    for source in ("ja", "en"):
        parts = sorted((parts_root(tmp_path / "out") / source).glob("[0-9]*"))  # as merge_datasets.py sorts
        assert len(parts) >= 2 or source == "en"
        groups = {
            p.name.removesuffix("_text_document.idx") for part in parts for p in part.glob("datasets/*.idx")
        }
        for group in groups:
            prefixes = [str(part / "datasets" / f"{group}_text_document") for part in parts]
            prefixes = [p for p in prefixes if Path(f"{p}.idx").is_file()]
            merged = str(tmp_path / f"megatron_{group}")
            builder = IndexedDatasetBuilder(f"{merged}.bin", dtype=IndexedDataset(prefixes[0]).index.dtype)
            for prefix in prefixes:
                builder.add_index(prefix)
            builder.finalize(f"{merged}.idx")
            for ext in ("bin", "idx"):
                ours = Path(reference.output_dir, "datasets", f"{group}_text_document.{ext}")
                assert filecmp.cmp(f"{merged}.{ext}", ours, shallow=False), (group, ext)
                compared += 1
    assert compared == 8  # en and three buckets of ja (the fourth is left out)
    merge_parts(checked, tokenizer_path)
    assert_same_as(tmp_path / "out", reference)


def test_the_merge_falls_back_to_a_plain_copy_midway(references, tokenizer_path, tmp_path, monkeypatch):
    """os.copy_file_range refused (EXDEV: other file systems; or no such call) after its first 10 bytes:
    the rest of that part and the next parts are copied by Python, and the bytes are the same."""
    real, calls = os.copy_file_range, []

    def first_call_only(source, target, count, *args):
        calls.append(count)
        if len(calls) > 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(source, target, min(count, 10), *args)

    monkeypatch.setattr(os, "copy_file_range", first_call_only)
    reference = references["bucketed"]
    config = copy_of(reference, tmp_path / "out", tasks=2)
    config.num_workers = 1
    tokenize(config, tokenizer_path)
    assert len(calls) > 2
    assert_same_as(tmp_path / "out", reference)


def test_a_plan_for_other_settings_starts_over(references, tokenizer_path, tmp_path):
    reference = references["curated"]
    config = copy_of(reference, tmp_path / "out", tasks=2)
    other = dataclasses.replace(config, tokenize=dataclasses.replace(config.tokenize, append_eod=False))
    checked, tokenizer = checked_settings(other, tokenizer_path)
    prepare_parts(checked, tokenizer)
    tokenize_task(checked, str(tokenizer_path), 0, 2)  # parts without </s>, then the run is stopped
    tokenize(config, tokenizer_path)
    assert_same_as(tmp_path / "out", reference)


def test_slurm_submits_the_tasks_and_a_dependent_merge_then_collects(
    references, tokenizer_path, tmp_path, monkeypatch
):
    pytest.importorskip("datatrove")
    from kumihimo.data_prep import cluster

    reference = references["curated"]
    config = copy_of(reference, tmp_path / "out", tasks=4)
    config.executor = dataclasses.replace(
        reference.executor, kind="datatrove-slurm", slurm_partition="cpu", slurm_cpus_per_task=2
    )
    submitted = []
    monkeypatch.setattr(cluster.SlurmPipelineExecutor, "run", lambda self: submitted.append(self))
    assert tokenize(config, tokenizer_path) is None
    merge = submitted[0]
    assert merge.tasks == 1 and isinstance(merge.pipeline[0], tokenize_parts.MergeTask)
    tasks = merge.depends
    assert tasks.tasks == 4 and isinstance(tasks.pipeline[0], tokenize_parts.TokenizeTask)
    assert tasks.pipeline[0].config.num_workers == 2  # each array task encodes with its own CPUs
    assert tasks.get_sbatch_args(4)["array"] == "0-3" and tasks.get_sbatch_args(4)["partition"] == "cpu"
    # what the jobs do, run here: then the same command collects the result
    step = tasks.pipeline[0]
    list(step(None, 0, 4))  # as submitted: the task's parts on one pool of 2 processes
    in_process = dataclasses.replace(step, config=dataclasses.replace(step.config, num_workers=1))
    for rank in range(1, 4):
        list(in_process(None, rank, 4))
    list(merge.pipeline[0](None, 0, 1))
    monkeypatch.setattr(cluster, "jobs_in_queue", lambda record: [])
    result = tokenize(config, tokenizer_path)
    assert result is not None and set(result.prefixes) == {"ja", "en"}
    assert_same_as(tmp_path / "out", reference)


def test_tokenize_tasks_keys_are_checked():
    for key in ("tokenize.tasks=0", "tokenize.part_bytes=0"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, ["input.sources=[{name: a, paths: [x]}]", key])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_tokenize_tasks_on_a_real_slurm_equal_the_single_process_run(
    references, tokenizer_path, tmp_path, cluster
):
    """`kumihimo data tokenize` with executor.kind=datatrove-slurm on the one-node Slurm of
    tests/slurm_cluster.py: a 3-task array and the merge job with afterok on it, then the same command
    prints the result and submits nothing."""
    pytest.importorskip("datatrove")
    from kumihimo.core import configtree
    from tests.slurm_cluster import PARTITION

    reference = references["curated"]
    config = copy_of(reference, tmp_path / "out", tasks=3)
    recipe = tmp_path / "data_prep.yaml"
    configtree.save(config, recipe)
    logs = tmp_path / "logs"
    command = [
        sys.executable,
        "-m",
        "kumihimo.cli",
        "data",
        "tokenize",
        str(recipe),
        "--tokenizer",
        str(tokenizer_path),
        "executor.kind=datatrove-slurm",
        f"executor.slurm_partition={PARTITION}",
        "executor.slurm_time=00:10:00",
        "executor.slurm_mem_per_cpu_gb=1",
        f"executor.logging_dir={logs}",
    ]
    submitted = cluster.run(*command)
    assert "Slurm jobs submitted" in submitted.stderr, submitted.stderr[-2000:]
    tasks_id, merge_id = json.loads((logs / "tokenize/slurm_jobs.json").read_text())
    assert f"afterok:{tasks_id}" in cluster.run("squeue", "-h", "-o", "%i %E").stdout
    deadline = time.monotonic() + 300
    while cluster.run("squeue", "-h").stdout.strip():
        assert time.monotonic() < deadline, cluster.run("squeue", "-h", "-o", "%i %j %T %r").stdout
        time.sleep(1)
    records = cluster.jobs()
    mine = [r for r in records if r["ArrayJobId"] in (tasks_id, merge_id)]
    assert sorted(r["ArrayTaskId"] for r in mine if r["ArrayJobId"] == tasks_id) == ["0", "1", "2"]
    assert all((r["JobState"], r["ExitCode"]) == ("COMPLETED", "0:0") for r in mine), mine
    assert_same_as(tmp_path / "out", reference)
    again = cluster.run(*command)
    assert "[tokenize] blend:" in again.stderr and len(cluster.jobs()) == len(records)
    assert_same_as(tmp_path / "out", reference)


def test_a_hugging_face_tokenizer_gives_the_same_bytes_in_tasks(tmp_path):
    """A Hugging Face folder: add_bos is turned off by its template in the tasks as in the single writer,
    and the markers record the same settings."""
    from test_data_prep_hf_tokenizer import LINES, make_hf_tokenizer, write_curated

    folder = make_hf_tokenizer(tmp_path / "hf", with_bos=True)
    texts = {"ja": [f"{i}: {line}" for i in range(60) for line in LINES[i % 3 : i % 3 + 2]], "en": LINES}
    reference = write_curated(tmp_path / "reference", texts, num_workers=1)
    build_datasets(reference, folder)
    config = copy_of(reference, tmp_path / "tasks", tasks=3)
    tokenize(config, folder)
    assert_same_as(tmp_path / "tasks", reference)


def test_build_datasets_says_it_does_not_run_the_tasks(references, tokenizer_path, tmp_path, capsys):
    config = copy_of(references["bucketed"], tmp_path / "out", tasks=4)
    build_datasets(config, tokenizer_path)  # the Python API: one writer per source, here
    assert "tokenize.tasks=4 is not applied by build_datasets" in capsys.readouterr().err
    assert not parts_root(tmp_path / "out").exists()
    assert_same_as(tmp_path / "out", references["bucketed"])

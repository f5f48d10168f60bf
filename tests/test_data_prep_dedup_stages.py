"""The distributed dedup stages decide exactly what the single-process find_duplicates decides."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_prep_pipeline import differing_outputs, write_corpus

from kumihimo.data_prep import dedup_stages
from kumihimo.data_prep.config import DataPrepConfig, DedupConfig
from kumihimo.data_prep.minhash import KEEP, MinHasher, exact_key, find_duplicates
from kumihimo.data_prep.pipeline import curate
from kumihimo.data_prep.shards import plan_shards

SHARD_SIZES = (300, 0, 517, 1, 682)


def planted_corpus(rng: np.random.Generator, num_docs: int, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact keys and signatures with near copies (each entry shared with probability J) and exact
    copies whose signatures differ (as text differing only in width does), across shard boundaries."""
    signatures = rng.integers(0, 2**32, size=(num_docs, num_perm), dtype=np.uint32)
    keys = rng.integers(0, 2**63, size=num_docs, dtype=np.uint64)
    for doc in range(1, num_docs):
        if rng.random() < 0.4:
            source = rng.integers(0, doc)
            shared = rng.random(num_perm) < rng.choice([0.5, 0.7, 0.9, 1.0])
            signatures[doc, shared] = signatures[source, shared]
        if rng.random() < 0.1:
            keys[doc] = keys[rng.integers(0, doc)]
    return keys, signatures


def write_shards(root: Path, keys: np.ndarray, signatures: np.ndarray, dedup: DedupConfig) -> list[Path]:
    dirs, start = [], 0
    for shard, size in enumerate(SHARD_SIZES):
        folder = root / f"shard-{shard}"
        folder.mkdir(parents=True)
        dedup_stages.write_shard_runs(
            folder, keys[start : start + size], signatures[start : start + size], dedup
        )
        dirs.append(folder)
        start += size
    return dirs


def make_plan(root: Path, dirs: list[Path], dedup: DedupConfig, num_tasks: int) -> dedup_stages.DedupPlan:
    config = DataPrepConfig(output_dir=str(root), dedup=dedup)
    return dedup_stages.DedupPlan(
        config=config, shard_dirs=tuple(dirs), folder=root / "dedup", num_tasks=num_tasks
    )


def run_stages(plan: dedup_stages.DedupPlan, passes: np.ndarray | None = None) -> None:
    for stage in dedup_stages.STAGES:
        for _ in dedup_stages.stage_runs(plan, stage):
            for unit in dedup_stages.stage_units(plan, stage):
                dedup_stages.run_unit(plan, stage, unit, passes)


def decisions(plan: dedup_stages.DedupPlan) -> dedup_stages.ShardDecision:
    offsets = plan.offsets()
    parts = [
        dedup_stages.load_shard_decision(plan, d, int(offsets[i + 1] - offsets[i]))
        for i, d in enumerate(plan.shard_dirs)
    ]
    return dedup_stages.ShardDecision(
        *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0]))
    )


def reference(keys, signatures, dedup: DedupConfig, passes=None) -> tuple[np.ndarray, np.ndarray]:
    """find_duplicates (over the passing rows when `passes` is given, as a refilter run decided)."""
    rows = np.arange(len(keys)) if passes is None else np.flatnonzero(passes)
    sub = find_duplicates(keys[rows], signatures[rows], dedup)
    duplicate_of = np.full(len(keys), dedup_stages.QUALITY_DROPPED, dtype=np.int64)
    duplicate_of[rows] = np.where(sub.duplicate_of == KEEP, KEEP, rows[np.maximum(sub.duplicate_of, 0)])
    is_exact = np.zeros(len(keys), dtype=bool)
    is_exact[rows] = sub.is_exact
    return duplicate_of, is_exact


def assert_same_as_reference(plan, keys, signatures, passes=None) -> None:
    duplicate_of, is_exact = reference(keys, signatures, plan.dedup, passes)
    got = decisions(plan)
    assert np.array_equal(got.duplicate_of, duplicate_of)
    assert np.array_equal(got.is_exact, is_exact)
    removed = duplicate_of[duplicate_of >= 0]
    sizes = 1 + np.bincount(removed, minlength=len(keys))
    kept = duplicate_of == KEEP
    assert np.array_equal(got.cluster_size[kept], sizes[kept])


@pytest.fixture(scope="module")
def corpus():
    dedup = DedupConfig(num_bands=8, rows_per_band=3)
    keys, signatures = planted_corpus(np.random.default_rng(7), sum(SHARD_SIZES), 24)
    return dedup, keys, signatures


@pytest.mark.parametrize("num_tasks", [1, 3, 17])
def test_stages_equal_find_duplicates_for_any_number_of_tasks(corpus, tmp_path, num_tasks, monkeypatch):
    dedup, keys, signatures = corpus
    monkeypatch.setattr(dedup_stages, "CHUNK_RECORDS", 97)  # many chunks per key range
    plan = make_plan(tmp_path, write_shards(tmp_path, keys, signatures, dedup), dedup, num_tasks)
    run_stages(plan)
    duplicate_of, _ = reference(keys, signatures, dedup)
    assert 100 < np.count_nonzero(duplicate_of >= 0) < len(keys) // 2  # the corpus has clusters to find
    assert_same_as_reference(plan, keys, signatures)
    summary = json.loads(plan.summary_path.read_text())
    assert summary["num_candidate_pairs"] == find_duplicates(keys, signatures, dedup).num_candidate_pairs


@pytest.mark.parametrize(
    "dedup",
    [
        DedupConfig(num_bands=8, rows_per_band=3, min_jaccard=0.8),
        DedupConfig(num_bands=8, rows_per_band=3, exact=False),
        DedupConfig(num_bands=8, rows_per_band=3, fuzzy=False),
    ],
    ids=["min_jaccard", "fuzzy_only", "exact_only"],
)
def test_stages_follow_the_dedup_switches(corpus, tmp_path, dedup):
    _, keys, signatures = corpus
    plan = make_plan(tmp_path, write_shards(tmp_path, keys, signatures, dedup), dedup, 3)
    run_stages(plan)
    assert_same_as_reference(plan, keys, signatures)


def test_documents_a_refilter_drops_take_no_part(corpus, tmp_path):
    dedup, keys, signatures = corpus
    passes = np.random.default_rng(3).random(len(keys)) < 0.7
    plan = make_plan(tmp_path, write_shards(tmp_path, keys, signatures, dedup), dedup, 2)
    run_stages(plan, passes)
    assert_same_as_reference(plan, keys, signatures, passes)


_KILLED_TASK = """
import os, sys, time
from pathlib import Path
from kumihimo.data_prep import dedup_stages
from kumihimo.data_prep.config import DataPrepConfig, DedupConfig
from kumihimo.data_prep.shards import plan_shards

root = Path(sys.argv[1])
plan = dedup_stages.DedupPlan(
    config=DataPrepConfig(output_dir=str(root), dedup=DedupConfig(num_bands=8, rows_per_band=3)),
    shard_dirs=tuple(sorted(root.glob("shard-*"))), folder=root / "dedup", num_tasks=3,
)
real_replace = os.replace

def stall(src, dst):  # the task is killed between writing a unit and renaming it into place
    print("written", flush=True)
    time.sleep(600)

os.replace = stall
for unit in dedup_stages.stage_units(plan, "bands")[1::3]:
    dedup_stages.run_unit(plan, "bands", unit)
"""


def test_a_killed_band_task_reruns_only_its_units(corpus, tmp_path):
    dedup, keys, signatures = corpus
    dirs = write_shards(tmp_path, keys, signatures, dedup)
    plan = make_plan(tmp_path, dirs, dedup, 3)
    for stage in ("exact", "alive"):
        for unit in dedup_stages.stage_units(plan, stage):
            dedup_stages.run_unit(plan, stage, unit)
    units = dedup_stages.stage_units(plan, "bands")
    for rank in (0, 2):
        for unit in units[rank::3]:
            dedup_stages.run_unit(plan, "bands", unit)
    env = {**os.environ, "PYTHONPATH": str(Path(dedup_stages.__file__).parents[2])}
    task = subprocess.Popen(
        [sys.executable, "-c", _KILLED_TASK, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert task.stdout.readline().strip() == "written"
    finally:
        task.send_signal(signal.SIGKILL)
        task.wait()
    assert task.returncode == -signal.SIGKILL
    pairs = plan.band_path(units[0]).parent
    assert [p.name for p in pairs.iterdir() if dedup_stages.TEMP_MARK in p.name]  # the killed unit's debris
    assert not plan.band_path(units[1]).exists()
    finished = {p.name: p.stat().st_mtime_ns for p in pairs.iterdir() if dedup_stages.TEMP_MARK not in p.name}
    assert len(finished) == len(units) - len(units[1::3])
    run_stages(plan)  # the resume: every stage again, finished units skipped
    assert {p.name: p.stat().st_mtime_ns for p in pairs.iterdir() if p.name in finished} == finished
    assert not [p.name for p in pairs.iterdir() if dedup_stages.TEMP_MARK in p.name]
    assert_same_as_reference(plan, keys, signatures)


_KILLED_LABELS = """
import os, sys, time
from pathlib import Path
from kumihimo.data_prep import dedup_stages
from kumihimo.data_prep.config import DataPrepConfig, DedupConfig

root = Path(sys.argv[1])
plan = dedup_stages.DedupPlan(
    config=DataPrepConfig(output_dir=str(root), dedup=DedupConfig(num_bands=8, rows_per_band=3)),
    shard_dirs=tuple(sorted(root.glob("shard-*"))), folder=root / "dedup", num_tasks=3,
)

def stall(src, dst):  # killed with the round's messages written, before renaming them
    print("written", flush=True)
    time.sleep(600)

os.replace = stall
dedup_stages.run_unit(plan, "labels", 1)
"""


def test_a_killed_label_round_is_redone_by_its_owner_alone(tmp_path):
    """Owner 1 dies in round 1 of the long chains; the others have finished that round. The resume
    redoes owner 1's round only, and the rounds go on to the same decision."""
    plan, keys, signatures = chained_plan_with_pairs(tmp_path, 3)
    for owner in (0, 1, 2):
        dedup_stages.run_unit(plan, "labels", owner)  # round 0
    for owner in (0, 2):
        dedup_stages.run_unit(plan, "labels", owner)  # round 1
    env = {**os.environ, "PYTHONPATH": str(Path(dedup_stages.__file__).parents[2])}
    task = subprocess.Popen(
        [sys.executable, "-c", _KILLED_LABELS, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert task.stdout.readline().strip() == "written"
    finally:
        task.send_signal(signal.SIGKILL)
        task.wait()
    assert dedup_stages.label_state(plan).done == 0
    debris = [p for p in plan.labels_dir(1).iterdir() if dedup_stages.TEMP_MARK in p.name]
    assert debris and not plan.label_path(1, 1).exists()
    finished = plan.label_path(0, 1).stat().st_mtime_ns
    dedup_stages.run_unit(plan, "labels", 0)  # round 1 is not over: owner 0 has nothing to do
    assert plan.label_path(0, 1).stat().st_mtime_ns == finished and not plan.label_path(0, 2).exists()
    run_stages(plan)
    assert not [p for p in plan.labels_dir(1).iterdir() if dedup_stages.TEMP_MARK in p.name]
    assert dedup_stages.label_state(plan).done > 2
    assert_same_as_reference(plan, keys, signatures)


@pytest.mark.slow
def test_curated_decisions_equal_find_duplicates_on_the_candidates(tmp_path):
    """Through `data curate` with three key ranges on two workers: the shards' candidates hashed again
    and decided by find_duplicates in one process give the same duplicate_of and cluster sizes."""
    config = write_corpus(tmp_path / "corpus")
    config.dedup = dataclasses.replace(config.dedup, record_cluster_size=True)
    config.executor = dataclasses.replace(config.executor, tasks=3)
    config.num_workers = 2
    curate(config)
    out = Path(config.output_dir)
    shard_dirs = [out / "work/shards" / s.shard_id for s in plan_shards(config)]
    plan = make_plan(out / "work", shard_dirs, config.dedup, 3)
    texts = [
        json.loads(line)["text"]
        for d in plan.shard_dirs
        for line in (d / "candidates.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    keys = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    signatures = MinHasher(config.dedup).signatures(texts)
    assert_same_as_reference(plan, keys, signatures)
    single = dataclasses.replace(config, output_dir=str(tmp_path / "single"), num_workers=1)
    single.executor = dataclasses.replace(config.executor, tasks=1)
    curate(single)
    assert differing_outputs(out, tmp_path / "single") == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open files through /proc")
def test_a_merge_holds_no_file_open_per_shard(corpus, tmp_path, monkeypatch):
    """A band task merges thousands of shards: a memory map kept per shard would hold a descriptor each."""
    dedup, keys, signatures = corpus
    monkeypatch.setattr(dedup_stages, "CHUNK_RECORDS", 97)
    dirs = write_shards(tmp_path, keys, signatures, dedup)
    plan = make_plan(tmp_path, dirs, dedup, 1)
    before = len(os.listdir("/proc/self/fd"))
    runs = [dedup_stages._load_run(d, dedup_stages.BAND_SORTED, 0) for d in dirs]
    chunks = dedup_stages.merged_chunks(runs, plan.offsets(), (0, 1 << 64), dedup_stages.ReadCounter())
    next(chunks)
    assert len(os.listdir("/proc/self/fd")) <= before
    assert sum(len(k) for k, _ in chunks) > 0


def test_shards_curated_before_the_sorted_runs_get_them_from_their_signatures(corpus, tmp_path):
    """A run resumed across the upgrade: its finished shards hold exact_keys.npy and signatures.npy only."""
    dedup, keys, signatures = corpus
    dirs = write_shards(tmp_path, keys, signatures, dedup)
    start = 0
    for folder, size in zip(dirs, SHARD_SIZES):
        for name in (*dedup_stages.EXACT_SORTED, *dedup_stages.BAND_SORTED):
            (folder / name).unlink()
        np.save(folder / dedup_stages.SIGNATURES, signatures[start : start + size])
        start += size
        dedup_stages.add_missing_runs(folder, dedup)
        assert not [p.name for p in folder.iterdir() if dedup_stages.TEMP_MARK in p.name]
    plan = make_plan(tmp_path, dirs, dedup, 2)
    run_stages(plan)
    assert_same_as_reference(plan, keys, signatures)


def chained_corpus(rng: np.random.Generator, num_docs: int, dedup: DedupConfig) -> tuple[np.ndarray, ...]:
    """Two paths of near duplicates through the documents in random order: each document shares one band
    with the one before it on its path and another band with the one after, and nothing else."""
    rows = dedup.rows_per_band
    signatures = rng.integers(0, 2**32, size=(num_docs, dedup.num_bands * rows), dtype=np.uint32)
    keys = rng.integers(0, 2**63, size=num_docs, dtype=np.uint64)
    order = rng.permutation(num_docs)
    for path in (order[: num_docs // 3], order[num_docs // 3 :]):
        for step, (a, b) in enumerate(zip(path[:-1], path[1:])):
            band = step % 2  # a's link forward and its link back lie in different bands
            signatures[[a, b], band * rows : (band + 1) * rows] = rng.integers(
                0, 2**32, rows, dtype=np.uint32
            )
    return keys, signatures


def chained_plan_with_pairs(
    root: Path, num_tasks: int
) -> tuple[dedup_stages.DedupPlan, np.ndarray, np.ndarray]:
    """The two long chains of chained_corpus in `num_tasks` owner ranges, with the stages before the label
    rounds (exact, alive, bands) run; the plan, keys and signatures."""
    dedup = DedupConfig(num_bands=8, rows_per_band=3)
    keys, signatures = chained_corpus(np.random.default_rng(11), sum(SHARD_SIZES), dedup)
    plan = make_plan(root, write_shards(root, keys, signatures, dedup), dedup, num_tasks)
    for stage in ("exact", "alive", "bands"):
        for unit in dedup_stages.stage_units(plan, stage):
            dedup_stages.run_unit(plan, stage, unit)
    return plan, keys, signatures


@pytest.mark.parametrize("num_tasks", [1, 17])
def test_a_long_chain_of_near_duplicates_across_owner_ranges_is_one_cluster(tmp_path, num_tasks):
    """The labels travel along paths of ~500 and ~1000 documents that cross every owner range many
    times: several rounds, each jump halving what is left, until every document points at its path's
    smallest."""
    dedup = DedupConfig(num_bands=8, rows_per_band=3)
    keys, signatures = chained_corpus(np.random.default_rng(11), sum(SHARD_SIZES), dedup)
    plan = make_plan(tmp_path, write_shards(tmp_path, keys, signatures, dedup), dedup, num_tasks)
    run_stages(plan)
    duplicate_of, _ = reference(keys, signatures, dedup)
    assert len(np.unique(duplicate_of[duplicate_of >= 0])) == 2  # the two paths, each one cluster
    assert_same_as_reference(plan, keys, signatures)
    assert 4 <= dedup_stages.label_state(plan).done <= 2 * np.log2(len(keys))


def test_the_label_task_stops_at_its_round_cap_and_the_next_run_resumes_the_rounds(tmp_path, monkeypatch):
    """The datatrove executors run the label rounds as one task (curation.run_label_rounds, each round's
    owner ranges on a pool of processes, two here): past MAX_LABEL_ROUNDS it fails saying how far it got
    and what to do; run again, it goes on from that round to the same decisions."""
    from kumihimo.data_prep import curation

    plan, keys, signatures = chained_plan_with_pairs(tmp_path, 5)
    with monkeypatch.context() as patch:
        patch.setattr(dedup_stages, "MAX_LABEL_ROUNDS", 3)
        with pytest.raises(
            RuntimeError, match=r"not settled after round 2 .*run the curation again: it resumes"
        ):
            curation.run_label_rounds(plan, 2)
    assert curation.run_label_rounds(plan, 2) > 0  # the bytes its rounds read (datatrove's bytes_read)
    state = dedup_stages.label_state(plan)
    assert state.converged and state.done > 3
    run_stages(plan)  # decide, sizes, cluster (the earlier stages' units are done and skipped)
    assert_same_as_reference(plan, keys, signatures)

"""Dedup at scale: the distributed stages (dedup_stages.py) vs the single-process find_duplicates vs
datatrove's MinHash buckets + cluster, on synthetic signatures with planted near-duplicate clusters.

    python benchmarks/bench_dedup_scale.py --docs 1000000 --tasks 1,4,16 --workdir /tmp/dedup-bench

Signatures are counter-based (entry (doc, column) is a hash of both), so any shard can be made without
the others: a planted copy takes each entry of its source with probability J, so a pair is caught by
LSH with probability exactly 1 - (1 - J^r)^b. Every task runs in its own process, one at a time; its
peak RSS (VmHWM), wall time and the bytes it read are printed as JSON lines, per stage (the label
rounds of the clustering summed, with their count). The stages' decisions are checked against find_duplicates'.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kumihimo.data_prep import dedup_stages
from kumihimo.data_prep.config import DataPrepConfig, DedupConfig
from kumihimo.data_prep.minhash import KEEP, catch_probability, find_duplicates, smallest_in_component
from kumihimo.data_prep.ngrams import mix64

JACCARDS = np.array([0.7, 0.75, 0.8, 0.85, 0.9, 1.0])
COPY_SHARE = 0.3  # documents that are a planted near copy of an earlier one
EXACT_SHARE = 0.05  # documents whose exact key repeats an earlier one's


SEED = 20261206


def _h(doc: np.ndarray, salt: int) -> np.ndarray:
    return mix64(doc.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt))


def planted_pairs(docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, Jaccard) per document: source -1 (none), -2 (an exact copy) or an earlier document at
    most 1000 back, whose signature entries the copy takes with probability J each."""
    is_copy = (_h(docs, 1) % np.uint64(1000)) < np.uint64(COPY_SHARE * 1000)
    source = np.where(is_copy, docs - 1 - (_h(docs, 2) % np.uint64(1000)).astype(np.int64), -1)
    source[source < 0] = -1  # the first documents have no earlier one
    jaccard = JACCARDS[(_h(docs, 3) % np.uint64(len(JACCARDS))).astype(np.int64)]
    return source, jaccard


def exact_copies(docs: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Which copies also repeat their source's text once normalised (the exact stage finds them)."""
    share = np.uint64(EXACT_SHARE / COPY_SHARE * 1000)
    return (source >= 0) & ((_h(docs, 6) % np.uint64(1000)) < share)


def _base(shard: int, bounds: np.ndarray, num_perm: int) -> np.ndarray:
    rng = np.random.default_rng([SEED, shard])
    return rng.integers(0, 2**32, size=(int(bounds[shard + 1] - bounds[shard]), num_perm), dtype=np.uint32)


def shard_corpus(shard: int, bounds: np.ndarray, num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact keys, signatures) of one shard; a copy's source may lie in the shard before."""
    docs = np.arange(bounds[shard], bounds[shard + 1])
    source, jaccard = planted_pairs(docs)
    signatures = _base(shard, bounds, num_perm)
    copies = np.flatnonzero(source >= 0)
    sources = np.empty((len(copies), num_perm), dtype=np.uint32)
    here = source[copies] >= bounds[shard]
    sources[here] = signatures[source[copies][here] - bounds[shard]]
    if not here.all():
        sources[~here] = _base(shard - 1, bounds, num_perm)[source[copies][~here] - bounds[shard - 1]]
    take = np.random.default_rng([SEED, shard, 1]).random((len(copies), num_perm)) < jaccard[copies, None]
    signatures[copies] = np.where(take, sources, signatures[copies])
    exact = exact_copies(docs, source)
    return _h(np.where(exact, source, docs), 7), signatures


def make_shards(
    root: Path, num_docs: int, num_shards: int, dedup: DedupConfig, keep_signatures: bool
) -> tuple[list[Path], float]:
    """Each shard's sorted runs (as phase 1 writes them) and, for the single-process run, its signatures."""
    dirs, seconds = [], 0.0
    bounds = np.linspace(0, num_docs, num_shards + 1).astype(np.int64)
    assert np.diff(bounds).min() >= 1000, (
        "shards of at least 1000 documents (a copy's source is <= 1000 back)"
    )
    for shard in range(num_shards):
        folder = root / f"shard-{shard:05d}"
        dirs.append(folder)
        if (folder / dedup_stages.EXACT_SORTED[0]).is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        keys, signatures = shard_corpus(shard, bounds, dedup.num_bands * dedup.rows_per_band)
        start = time.perf_counter()
        dedup_stages.write_shard_runs(folder, keys, signatures, dedup)
        seconds += time.perf_counter() - start
        if keep_signatures:
            np.save(folder / dedup_stages.SIGNATURES, signatures)
    return dirs, seconds


def make_plan(root: Path, dirs: list[Path], dedup: DedupConfig, num_tasks: int) -> dedup_stages.DedupPlan:
    folder = root / f"dedup-{num_tasks}"
    return dedup_stages.DedupPlan(
        config=DataPrepConfig(dedup=dedup), shard_dirs=tuple(dirs), folder=folder, num_tasks=num_tasks
    )


def _child(args: argparse.Namespace) -> None:
    """One task in this process: print {wall_s, peak_rss_mib, bytes_read}."""
    dedup = DedupConfig(num_bands=args.bands, rows_per_band=args.rows)
    root = Path(args.workdir)
    dirs = sorted(root.glob("shard-*"))
    start = time.perf_counter()
    if args.child == "single":
        bytes_read = single_process(root, dirs, dedup)
    else:
        plan = make_plan(root, dirs, dedup, args.num_tasks)
        units = dedup_stages.stage_units(plan, args.child)[args.rank :: args.num_tasks]
        bytes_read = sum(dedup_stages.run_unit(plan, args.child, u) for u in units)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mib": peak_rss_mib(), "bytes_read": bytes_read}))


def peak_rss_mib() -> int:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would carry the forking parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def single_process(root: Path, dirs: list[Path], dedup: DedupConfig) -> int:
    """Today's phase 2: every shard's signatures copied into one memory map, then find_duplicates."""
    num_perm = dedup.num_bands * dedup.rows_per_band
    sizes = [len(np.load(d / dedup_stages.EXACT_KEYS, mmap_mode="r")) for d in dirs]
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    path = root / "single-signatures.npy"
    signatures = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.uint32, shape=(int(offsets[-1]), num_perm)
    )
    for i, start in enumerate(offsets[:-1]):
        signatures[start : offsets[i + 1]] = np.load(dirs[i] / dedup_stages.SIGNATURES)
    signatures.flush()
    keys = np.concatenate([np.load(d / dedup_stages.EXACT_KEYS) for d in dirs])
    decision = find_duplicates(keys, signatures, dedup)
    np.save(root / "single-duplicate_of.npy", decision.duplicate_of)
    del signatures
    path.unlink()
    # each shard's signatures read, the memory map written, then read again by the band slices
    return int(offsets[-1]) * num_perm * 4 * 2


def run_child(args: argparse.Namespace, stage: str, rank: int = 0, num_tasks: int = 1) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--workdir",
        args.workdir,
        "--bands",
        str(args.bands),
        "--rows",
        str(args.rows),
    ]
    cmd += ["--child", stage, "--rank", str(rank), "--num-tasks", str(num_tasks)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_stages(args: argparse.Namespace, dirs: list[Path], dedup: DedupConfig, num_tasks: int) -> dict:
    plan = make_plan(Path(args.workdir), dirs, dedup, num_tasks)
    shutil.rmtree(plan.folder, ignore_errors=True)
    row = {"tasks": num_tasks}
    for stage in dedup_stages.STAGES:
        ranks = range(1) if stage in dedup_stages.ONE_TASK_STAGES else range(num_tasks)
        results, runs = [], 0
        for _ in dedup_stages.stage_runs(plan, stage):  # "labels": one run per round
            results += [run_child(args, stage, r, num_tasks) for r in ranks]
            runs += 1
        row[stage] = {
            "max_peak_rss_mib": max(r["peak_rss_mib"] for r in results),
            "sum_wall_s": round(sum(r["wall_s"] for r in results), 1),
            "max_wall_s": max(r["wall_s"] for r in results),
            "bytes_read": sum(r["bytes_read"] for r in results),
        }
        if stage == "labels":
            row[stage]["rounds"] = runs
        print(json.dumps({stage: row[stage], "tasks": num_tasks}), flush=True)
    return row


def stage_decisions(plan: dedup_stages.DedupPlan) -> np.ndarray:
    offsets = plan.offsets()
    return np.concatenate(
        [
            dedup_stages.load_shard_decision(plan, d, int(offsets[i + 1] - offsets[i])).duplicate_of
            for i, d in enumerate(plan.shard_dirs)
        ]
    )


def catch_rates(duplicate_of: np.ndarray) -> dict[float, float]:
    """Share of planted near pairs (copy, source that is no copy itself) that end in one cluster."""
    docs = np.arange(len(duplicate_of))
    source, jaccard = planted_pairs(docs)
    root = np.where(duplicate_of == KEEP, docs, duplicate_of)
    ok = (source >= 0) & ~exact_copies(docs, source)
    ok[ok] = planted_pairs(source[ok])[0] == -1
    rates = {}
    for j in JACCARDS:
        pairs = ok & (jaccard == j)
        rates[float(j)] = round(float(np.mean(root[pairs] == root[source[pairs]])), 4)
    return rates


def datatrove_run(args: argparse.Namespace, dedup: DedupConfig) -> dict:
    """datatrove's MinhashDedupBuckets + MinhashDedupCluster on the first --datatrove-docs documents."""
    from datatrove.pipeline.dedup.minhash import (
        HashConfig,
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
    )

    root = Path(args.workdir) / "datatrove"
    shutil.rmtree(root, ignore_errors=True)
    config = MinhashConfig(
        num_buckets=dedup.num_bands,
        hashes_per_bucket=dedup.rows_per_band,
        hash_config=HashConfig(precision=32, hash_fc="sha1"),
    )
    num_docs, rows = args.datatrove_docs, dedup.rows_per_band
    bounds = np.array([0, num_docs])
    _, signatures = shard_corpus(0, bounds, dedup.num_bands * rows)
    fields = [(f"h{i:02d}", "<u4") for i in range(rows)] + [("doc", "<u4")]
    for band in range(dedup.num_bands):  # one input file (rank 0) per bucket, sorted as datatrove writes it
        records = np.empty(num_docs, dtype=fields)
        for i in range(rows):
            records[f"h{i:02d}"] = signatures[:, band * rows + i]
        records["doc"] = np.arange(num_docs)
        records.sort(order=[f for f, _ in fields])
        (root / "sigs" / f"bucket_{band:03d}").mkdir(parents=True)
        records.tofile(root / "sigs" / f"bucket_{band:03d}" / "00000.minhash.sig")
    start = time.perf_counter()
    buckets = MinhashDedupBuckets(
        input_folder=str(root / "sigs"), output_folder=str(root / "buckets"), config=config
    )
    for rank in range(dedup.num_bands):
        for _ in buckets.run(None, rank, dedup.num_bands) or ():
            pass
    bucket_s = time.perf_counter() - start
    start = time.perf_counter()
    cluster = MinhashDedupCluster(
        input_folder=str(root / "buckets"), output_folder=str(root / "remove"), config=config
    )
    for _ in cluster.run(None, 0, 1) or ():
        pass
    cluster_s = time.perf_counter() - start
    remove = root / "remove" / "000000.remove"
    removed = np.fromfile(remove, dtype="<u4") if remove.is_file() else np.empty(0, np.uint32)
    dups = [np.fromfile(p, dtype="<u4").reshape(-1, 4) for p in sorted((root / "buckets").glob("*.dups"))]
    pairs = np.concatenate([np.empty((0, 4), np.uint32)] + dups)
    labels = smallest_in_component(num_docs, pairs[:, 1].astype(np.int64), pairs[:, 3].astype(np.int64))
    duplicate_of = np.where(labels == np.arange(num_docs), KEEP, labels)
    ours = find_duplicates(
        np.arange(num_docs, dtype=np.uint64), signatures, dataclasses.replace(dedup, exact=False)
    )
    return {
        "docs": num_docs,
        "buckets_s": round(bucket_s, 1),
        "cluster_s": round(cluster_s, 1),
        "pairs_written": len(pairs),
        "removed": len(removed),
        "removed_by_find_duplicates": int(np.count_nonzero(ours.duplicate_of != KEEP)),
        "caught": catch_rates(duplicate_of),
        "caught_by_find_duplicates": catch_rates(ours.duplicate_of),
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--bands", type=int, default=40)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--tasks", default="1,4,16")
    parser.add_argument("--workdir", default="/tmp/kumihimo-dedup-bench")
    parser.add_argument("--datatrove-docs", type=int, default=100_000)
    parser.add_argument("--skip-single", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--num-tasks", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args)
    dedup = DedupConfig(num_bands=args.bands, rows_per_band=args.rows)
    root = Path(args.workdir)
    start = time.perf_counter()
    dirs, sort_s = make_shards(root, args.docs, args.shards, dedup, keep_signatures=not args.skip_single)
    run_bytes = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    print(
        json.dumps(
            {
                "docs": args.docs,
                "shards": args.shards,
                "make_s": round(time.perf_counter() - start, 1),
                "phase1_sort_s": round(sort_s, 1),
                "run_bytes": run_bytes,
            }
        ),
        flush=True,
    )
    reference = first = None
    if not args.skip_single:
        single = run_child(args, "single")
        print(json.dumps({"single": single}), flush=True)
        reference = np.load(root / "single-duplicate_of.npy")
    for num_tasks in [int(t) for t in args.tasks.split(",")]:
        run_stages(args, dirs, dedup, num_tasks)
        got = stage_decisions(make_plan(root, dirs, dedup, num_tasks))
        if reference is not None:
            assert np.array_equal(got, reference), f"{num_tasks} tasks decide otherwise than find_duplicates"
            print(json.dumps({"tasks": num_tasks, "equal_to_find_duplicates": True}), flush=True)
        elif first is not None:  # --skip-single: every task count against the first
            assert np.array_equal(got, first), f"{num_tasks} tasks decide otherwise than the first count"
            print(json.dumps({"tasks": num_tasks, "equal_to_the_first_task_count": True}), flush=True)
        first = got if first is None else first
    rates = catch_rates(got)
    theory = {j: catch_probability(j, dedup.num_bands, dedup.rows_per_band) for j in rates}
    print(json.dumps({"caught": rates, "theory": {j: round(t, 4) for j, t in theory.items()}}), flush=True)
    if args.datatrove_docs:
        print(json.dumps({"datatrove": datatrove_run(args, dedup)}), flush=True)


if __name__ == "__main__":
    main()

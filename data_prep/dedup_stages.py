"""Exact and fuzzy dedup as distributed stages: the sorted per-shard runs, their merge, the clustering.

Owns the dedup files under `<out>/work/` and the stages that read them; minhash.py owns the hashes and
the single-process reference `find_duplicates`, whose decisions these stages reproduce exactly.

  phase 1 (shard_stage, per shard)  exact keys sorted, with their rows (exact_sorted_{keys,rows}.npy);
                                    per band, band keys sorted, with their rows (band_sorted_{keys,rows}.npy,
                                    bands x documents): 12 bytes per document and band
  exact   (T tasks, key ranges)     merges every shard's slice of its key range; writes the groups
                                    of equal keys (members in global order)
  alive   (1 task)                  exact groups -> each copy's first; quality passes (refilter runs);
                                    a bitmap (N/8 bytes) of the documents that take part in fuzzy dedup
  bands   (T tasks, band x range)   merges every shard's slice of one band's key range, skipping the
                                    documents not alive; writes (member, first member) candidate pairs
  cluster (1 task)                  connected components over the pairs only, exact copies chained to
                                    the final keeper, cluster sizes; one sparse decision file per shard
Phase 3 (curation._merge_source) is the filter per shard: it reads that shard's decision file.
curation.py runs the stages on a local process pool, data_prep/cluster.py as datatrove tasks (local
or Slurm); a unit's output is written under a temporary name and renamed, so a killed task redoes
only its unfinished units.

The merge of a key range reads, from every shard's sorted run, the slice between two keys (found by a
binary search in a memory map that is closed again, ~log2(n) pages; the slice read by file offset, so no
descriptor stays open per shard) for a sub-range sized to CHUNK_RECORDS records in all, sorts the
concatenation and hands it on; hash keys are uniform, so a task's memory is bounded by the chunk, not by
the corpus, and every record is read exactly once. The cluster step is the one that grows with the
corpus: it holds every candidate pair (docs/data_prep.md, "Dedup at scale").
The representative of a group is its smallest global index (source order, file, line), as in
find_duplicates: a bucket's pairs are (member, smallest alive member), components are labelled by their
smallest member, and an exact copy points at the final keeper of the copy it repeats.

Why not datatrove's MinhashDedupSignature/Buckets/Cluster blocks: its signature step hashes word
shingles from a word tokenizer (ours are character n-grams over the text with spaces removed, the
Japanese references' choice, computed in phase 1 with the other measurements); its bucket step cannot
leave out exact copies or documents a refilter's thresholds drop, which changes the components; it has
no Jaccard check of candidates (dedup.min_jaccard); and its clustering joins sets by size, which keeps a
different document than the smallest global index. Its heap merge also handles one Python object per
record (~20x our chunked numpy merge in benchmarks/bench_dedup_scale.py, which runs its buckets + cluster
on the same signatures). Its executors and PipelineStep run these stages (data_prep/cluster.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kumihimo.core.files import TEMP_MARK, temp_file_beside, write_text_atomic
from kumihimo.data_prep.config import DataPrepConfig, DedupConfig
from kumihimo.data_prep.minhash import (
    KEEP,
    QUALITY_DROPPED,
    band_keys,
    estimated_jaccard,
    smallest_in_component,
)

EXACT_KEYS = "exact_keys.npy"  # per shard: uint64 per candidate, in row order (counts, old-run rebuilds)
SIGNATURES = "signatures.npy"  # per shard: uint32 (rows, bands x rows); written only for dedup.min_jaccard
# sorted runs: keys (uint64) and rows (uint32) in separate files, so that a binary search over the keys'
# memory map touches a few pages (np.searchsorted would copy a strided field of a record array whole)
EXACT_SORTED = ("exact_sorted_keys.npy", "exact_sorted_rows.npy")
BAND_SORTED = ("band_sorted_keys.npy", "band_sorted_rows.npy")
# records per merged chunk (12 bytes each, ~4x that while sorting): ~200 MB per task
CHUNK_RECORDS = 1 << 22
_KEY_SPACE = 1 << 64


# ---- phase 1: per-shard sorted runs ---------------------------------------------------------------


def _sort(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")  # stable: equal keys stay in row order
    return keys[order], order.astype(np.uint32)


def write_shard_runs(
    folder: Path, exact_keys: np.ndarray, signatures: np.ndarray | None, config: DedupConfig
) -> None:
    """The shard's dedup files into `folder` (phase 1 writes them into its temporary shard folder)."""
    np.save(folder / EXACT_KEYS, exact_keys)
    if signatures is not None:
        rows = config.rows_per_band
        keys = np.empty((config.num_bands, len(signatures)), dtype=np.uint64)
        order = np.empty((config.num_bands, len(signatures)), dtype=np.uint32)
        for band in range(config.num_bands):
            keys[band], order[band] = _sort(band_keys(signatures[:, band * rows : (band + 1) * rows]))
        np.save(folder / BAND_SORTED[0], keys)
        np.save(folder / BAND_SORTED[1], order)
    sorted_keys, order = _sort(exact_keys)
    np.save(folder / EXACT_SORTED[1], order)
    np.save(folder / EXACT_SORTED[0], sorted_keys)  # last: add_missing_runs tests for it
    if config.min_jaccard is not None:
        np.save(folder / SIGNATURES, signatures)


def add_missing_runs(shard_dir: Path, config: DedupConfig) -> None:
    """Sorted runs for a shard that phase 1 finished before they existed (kept signatures.npy instead)."""
    if (shard_dir / EXACT_SORTED[0]).is_file():
        return
    staging = shard_dir / f".runs{TEMP_MARK}{os.getpid()}"
    staging.mkdir(exist_ok=True)
    signatures = np.load(shard_dir / SIGNATURES) if config.fuzzy else None
    write_shard_runs(staging, np.load(shard_dir / EXACT_KEYS), signatures, config)
    for name in (*BAND_SORTED, *EXACT_SORTED):  # exact keys last: their presence says all are there
        if (staging / name).is_file():
            os.replace(staging / name, shard_dir / name)
    for leftover in staging.iterdir():
        leftover.unlink()
    staging.rmdir()


# ---- the run's layout and plan --------------------------------------------------------------------


@dataclass(frozen=True)
class DedupPlan:
    """Where one run's dedup files are and how its work is cut into units (the same in every task)."""

    config: DataPrepConfig
    shard_dirs: tuple[Path, ...]  # in global order
    folder: Path  # <out>/work/dedup
    num_tasks: int

    @property
    def dedup(self) -> DedupConfig:
        return self.config.dedup

    @property
    def num_band_parts(self) -> int:
        """Key ranges per band: enough that every one of num_tasks tasks owns at least one unit."""
        return max(1, math.ceil(self.num_tasks / self.dedup.num_bands))

    def exact_units(self) -> list[int]:
        return list(range(self.num_tasks)) if self.dedup.exact else []

    def band_units(self) -> list[tuple[int, int]]:
        if not self.dedup.fuzzy:
            return []
        return [(band, part) for band in range(self.dedup.num_bands) for part in range(self.num_band_parts)]

    def exact_path(self, unit: int) -> Path:
        return self.folder / "exact" / f"range-{unit:05d}-of-{self.num_tasks:05d}.npz"

    def band_path(self, unit: tuple[int, int]) -> Path:
        band, part = unit
        return self.folder / "pairs" / f"band-{band:03d}-range-{part:05d}-of-{self.num_band_parts:05d}.npz"

    @property
    def alive_path(self) -> Path:
        return self.folder / "alive.npz"

    @property
    def summary_path(self) -> Path:
        """Written last by the cluster step: its presence means every shard's decision is there."""
        return self.folder / "decision.json"

    def decision_path(self, shard_dir: Path) -> Path:
        return self.folder / "decisions" / f"{shard_dir.name}.npz"

    def offsets(self) -> np.ndarray:
        """Global index of each shard's first candidate (and the total last), from the keys' headers;
        read once per process (a task's units share it)."""
        return self._offsets

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        sizes = [len(np.load(d / EXACT_KEYS, mmap_mode="r")) for d in self.shard_dirs]
        return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).astype(np.int64)

    @functools.cached_property
    def alive(self) -> np.ndarray:
        """The alive stage's bitmap (N/8 bytes), read once per process."""
        return np.load(self.alive_path)["alive"]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, renamed when complete: the file's presence marks the unit done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{TEMP_MARK}*"):  # a killed attempt at this unit
        stale.unlink(missing_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- the merge of sorted runs ---------------------------------------------------------------------


@dataclass
class ReadCounter:
    """Bytes a task copied out of the sorted runs (what a merge reads; binary-search probes excluded)."""

    num_bytes: int = 0


def _key_range(unit: int, num_units: int) -> tuple[int, int]:
    return unit * _KEY_SPACE // num_units, (unit + 1) * _KEY_SPACE // num_units


@dataclass(frozen=True)
class _Vector:
    """One 1-D array stored in an .npy file (a band's row of a 2-D one), read in slices by offset: a
    task merges thousands of shards, and a memory map per shard would hold a file descriptor each."""

    path: Path
    offset: int  # bytes from the file's start to element 0
    dtype: np.dtype
    length: int

    @classmethod
    def of(cls, path: Path, band: int | None) -> _Vector:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(handle)
            offset = handle.tell()
        length = shape[-1]
        if band is not None:
            offset += band * length * dtype.itemsize
        return cls(path, offset, dtype, length)

    def positions(self, bounds: list[int]) -> np.ndarray:
        """Index of the first element >= each bound (2^64 = the end): a binary search in a memory map
        that is closed again before returning."""
        if not self.length:
            return np.zeros(len(bounds), dtype=np.int64)
        keys = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.length,))
        inner = np.array([b for b in bounds if b < _KEY_SPACE], dtype=np.uint64)
        found = np.searchsorted(keys, inner, side="left")
        del keys
        return np.concatenate((found, np.full(len(bounds) - len(inner), self.length))).astype(np.int64)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.fromfile(
            self.path, dtype=self.dtype, count=stop - start, offset=self.offset + start * self.dtype.itemsize
        )


Run = tuple[_Vector, _Vector]  # one shard's sorted keys (uint64) and their rows (uint32)


def _load_run(shard_dir: Path, names: tuple[str, str], band: int | None = None) -> Run:
    return _Vector.of(shard_dir / names[0], band), _Vector.of(shard_dir / names[1], band)


def merged_chunks(
    runs: list[Run], offsets: np.ndarray, key_range: tuple[int, int], counter: ReadCounter
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, global indices) of `runs` (one per shard) in `key_range`, sorted by key then index, in
    chunks of about CHUNK_RECORDS; the entries of one key are never split."""
    lo, hi = key_range
    ends = [keys.positions([lo, hi]) for keys, _ in runs]
    total = sum(int(e[1] - e[0]) for e in ends)
    num_chunks = max(1, math.ceil(total / CHUNK_RECORDS))
    bounds = [lo + (hi - lo) * j // num_chunks for j in range(num_chunks + 1)]
    cuts = [keys.positions(bounds) for keys, _ in runs]
    for j in range(num_chunks):
        keys, index = [], []
        for shard, ((run_keys, run_rows), cut) in enumerate(zip(runs, cuts)):
            if cut[j + 1] > cut[j]:
                part_keys = run_keys.read(cut[j], cut[j + 1])
                part_rows = run_rows.read(cut[j], cut[j + 1])
                counter.num_bytes += part_keys.nbytes + part_rows.nbytes
                keys.append(part_keys)
                index.append(part_rows.astype(np.int64) + offsets[shard])
        if not keys:
            continue
        keys_all, index_all = np.concatenate(keys), np.concatenate(index)
        order = np.lexsort((index_all, keys_all))
        yield keys_all[order], index_all[order]


def _new_key(keys: np.ndarray) -> np.ndarray:
    return np.concatenate(([True], keys[1:] != keys[:-1])) if len(keys) else np.empty(0, dtype=bool)


def _firsts(starts: np.ndarray) -> np.ndarray:
    """Position of each entry's group start."""
    return np.maximum.accumulate(np.where(starts, np.arange(len(starts)), 0))


# ---- the stages ------------------------------------------------------------------------------------


def exact_unit(plan: DedupPlan, unit: int) -> int:
    """Groups of equal exact keys in one key range: members in (key, index) order and where groups start.
    Returns the bytes read."""
    if plan.exact_path(unit).is_file():
        return 0
    offsets, counter = plan.offsets(), ReadCounter()
    runs = [_load_run(d, EXACT_SORTED) for d in plan.shard_dirs]
    members, starts = [np.empty(0, np.int64)], [np.empty(0, bool)]
    for keys, index in merged_chunks(runs, offsets, _key_range(unit, plan.num_tasks), counter):
        new = _new_key(keys)
        in_group = ~new | np.concatenate((~new[1:], [False]))
        members.append(index[in_group])
        starts.append(new[in_group])
    _save_npz(plan.exact_path(unit), members=np.concatenate(members), starts=np.concatenate(starts))
    return counter.num_bytes


def alive_step(plan: DedupPlan, passes: np.ndarray | None) -> None:
    """Each exact copy's first and who takes part in LSH; `passes` (a refilter run's thresholds, per
    document) leaves the others out of both."""
    if plan.alive_path.is_file():
        return
    num_docs = int(plan.offsets()[-1])
    members, starts = np.empty(0, np.int64), np.empty(0, bool)
    if plan.exact_units():
        with_parts = [np.load(plan.exact_path(u)) for u in plan.exact_units()]
        members = np.concatenate([p["members"] for p in with_parts])
        starts = np.concatenate([p["starts"] for p in with_parts])
    if passes is not None and len(members):
        group = np.cumsum(starts)
        taking_part = passes[members]
        members, group = members[taking_part], group[taking_part]
        starts = _new_key(group)
    copies = ~starts
    firsts = members[_firsts(starts)][copies]
    copies_of = members[copies]
    order = np.argsort(copies_of)
    alive = np.ones(num_docs, dtype=bool) if passes is None else passes.copy()
    alive[copies_of] = False
    _save_npz(
        plan.alive_path,
        exact_members=copies_of[order],
        exact_firsts=firsts[order],
        alive=np.packbits(alive),
        passes=np.packbits(passes) if passes is not None else np.empty(0, np.uint8),
    )


def _bits(packed: np.ndarray, index: np.ndarray) -> np.ndarray:
    return ((packed[index >> 3] >> (7 - (index & 7)).astype(np.uint8)) & 1).astype(bool)


def _signature_rows(plan: DedupPlan, offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    shard_of = np.searchsorted(offsets, index, side="right") - 1
    out = np.empty((len(index), plan.dedup.num_bands * plan.dedup.rows_per_band), dtype=np.uint32)
    for shard in np.unique(shard_of):
        mine = shard_of == shard
        signatures = np.load(plan.shard_dirs[shard] / SIGNATURES, mmap_mode="r")
        out[mine] = signatures[index[mine] - offsets[shard]]
    return out


def band_unit(plan: DedupPlan, unit: tuple[int, int]) -> int:
    """Candidate pairs (member, smallest alive member of its bucket) of one band's key range; with
    dedup.min_jaccard, whether each pair's full signatures agree enough. Returns the bytes read."""
    if plan.band_path(unit).is_file():
        return 0
    band, part = unit
    offsets, counter = plan.offsets(), ReadCounter()
    first_read = "alive" not in plan.__dict__
    alive = plan.alive
    counter.num_bytes += alive.nbytes if first_read else 0
    runs = [_load_run(d, BAND_SORTED, band) for d in plan.shard_dirs]
    lefts, rights = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for keys, index in merged_chunks(runs, offsets, _key_range(part, plan.num_band_parts), counter):
        taking_part = _bits(alive, index)
        keys, index = keys[taking_part], index[taking_part]
        new = _new_key(keys)
        lefts.append(index[~new])
        rights.append(index[_firsts(new)][~new])
    left, right = np.concatenate(lefts), np.concatenate(rights)
    similar = np.ones(len(left), dtype=bool)
    if plan.dedup.min_jaccard is not None and len(left):
        a, b = _signature_rows(plan, offsets, left), _signature_rows(plan, offsets, right)
        counter.num_bytes += a.nbytes + b.nbytes
        similar = estimated_jaccard(a, b) >= plan.dedup.min_jaccard
    _save_npz(plan.band_path(unit), left=left, right=right, similar=similar)
    return counter.num_bytes


def _count_distinct_pairs(left: np.ndarray, right: np.ndarray) -> int:
    if not len(left):
        return 0
    order = np.lexsort((right, left))
    left, right = left[order], right[order]
    return 1 + int(np.count_nonzero((left[1:] != left[:-1]) | (right[1:] != right[:-1])))


@dataclass(frozen=True)
class Removed:
    """The documents dedup removes, sorted by global index, and the kept document each points at."""

    index: np.ndarray
    target: np.ndarray
    is_exact: np.ndarray


def _near_duplicates(plan: DedupPlan) -> tuple[Removed, int]:
    parts = [np.load(plan.band_path(u)) for u in plan.band_units()]
    left = np.concatenate([np.empty(0, np.int64)] + [p["left"] for p in parts])
    right = np.concatenate([np.empty(0, np.int64)] + [p["right"] for p in parts])
    similar = np.concatenate([np.empty(0, bool)] + [p["similar"] for p in parts])
    num_pairs = _count_distinct_pairs(left, right)
    left, right = left[similar], right[similar]
    nodes = np.unique(np.concatenate((left, right)))  # sorted: the smallest label is the smallest index
    labels = smallest_in_component(len(nodes), np.searchsorted(nodes, left), np.searchsorted(nodes, right))
    near = labels != np.arange(len(nodes))
    removed = Removed(nodes[near], nodes[labels[near]], np.zeros(int(near.sum()), dtype=bool))
    return removed, num_pairs


def cluster_step(plan: DedupPlan) -> None:
    """Components over the candidate pairs, exact copies chained to the final keeper, cluster sizes;
    one decision file per shard, then the summary that marks the whole decision complete."""
    if plan.summary_path.is_file():
        return
    offsets = plan.offsets()
    alive = np.load(plan.alive_path)
    near, num_pairs = _near_duplicates(plan)
    exact_target = alive["exact_firsts"].copy()
    at = np.searchsorted(near.index, exact_target)
    lost = at < len(near.index)
    lost[lost] = near.index[at[lost]] == exact_target[lost]
    exact_target[lost] = near.target[at[lost]]  # the copy it repeats lost as a near duplicate
    index = np.concatenate((near.index, alive["exact_members"]))
    order = np.argsort(index, kind="stable")
    removed = Removed(
        index[order],
        np.concatenate((near.target, exact_target))[order],
        np.concatenate((near.is_exact, np.ones(len(exact_target), bool)))[order],
    )
    keepers, counts = np.unique(removed.target, return_counts=True)
    passes = alive["passes"]
    for shard, shard_dir in enumerate(plan.shard_dirs):
        start, end = int(offsets[shard]), int(offsets[shard + 1])
        a, b = np.searchsorted(removed.index, [start, end])
        k0, k1 = np.searchsorted(keepers, [start, end])
        rows = np.arange(start, end)
        dropped = np.flatnonzero(~_bits(passes, rows)) if len(passes) else np.empty(0, np.int64)
        _save_npz(
            plan.decision_path(shard_dir),
            removed_rows=removed.index[a:b] - start,
            removed_target=removed.target[a:b],
            removed_is_exact=removed.is_exact[a:b],
            keeper_rows=keepers[k0:k1] - start,
            keeper_cluster_size=1 + counts[k0:k1],
            quality_dropped_rows=dropped,
        )
    summary = {
        "num_documents": int(offsets[-1]),
        "num_removed": len(removed.index),
        "num_candidate_pairs": num_pairs,
        "offsets": offsets.tolist(),
    }
    write_text_atomic(plan.summary_path, json.dumps(summary))


@dataclass(frozen=True)
class ShardDecision:
    """One shard's rows: the global index each removed row points at (or KEEP / QUALITY_DROPPED),
    whether it was removed as an exact copy, and 1 + the duplicates removed in favour of each row."""

    duplicate_of: np.ndarray
    is_exact: np.ndarray
    cluster_size: np.ndarray


def load_shard_decision(plan: DedupPlan, shard_dir: Path, num_rows: int) -> ShardDecision:
    with np.load(plan.decision_path(shard_dir)) as data:
        duplicate_of = np.full(num_rows, KEEP, dtype=np.int64)
        duplicate_of[data["quality_dropped_rows"]] = QUALITY_DROPPED
        duplicate_of[data["removed_rows"]] = data["removed_target"]
        is_exact = np.zeros(num_rows, dtype=bool)
        is_exact[data["removed_rows"]] = data["removed_is_exact"]
        cluster_size = np.ones(num_rows, dtype=np.int64)
        cluster_size[data["keeper_rows"]] = data["keeper_cluster_size"]
    return ShardDecision(duplicate_of, is_exact, cluster_size)


def removed_targets(plan: DedupPlan) -> np.ndarray:
    """Global indices of the kept documents that removed duplicates point at (sorted, unique)."""
    targets = [np.load(plan.decision_path(d))["removed_target"] for d in plan.shard_dirs]
    return np.unique(np.concatenate([np.empty(0, np.int64)] + targets))


# ---- running the stages ----------------------------------------------------------------------------

STAGES = ("exact", "alive", "bands", "cluster")


def stage_units(plan: DedupPlan, stage: str) -> list:
    """The units of a stage; task `rank` of `world_size` runs units rank, rank + world_size, ..."""
    return {"exact": plan.exact_units(), "alive": [None], "bands": plan.band_units(), "cluster": [None]}[
        stage
    ]


def run_unit(plan: DedupPlan, stage: str, unit, passes: np.ndarray | None = None) -> int:
    """One unit of a stage (skipped when its output is there); returns the bytes it read. `passes`
    matters to the alive stage only."""
    if stage == "exact":
        return exact_unit(plan, unit)
    if stage == "bands":
        return band_unit(plan, unit)
    if stage == "alive":
        alive_step(plan, passes)
    elif stage == "cluster":
        cluster_step(plan)
    return 0

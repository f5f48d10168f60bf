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
                                    documents not alive; writes (member, first member) candidate pairs,
                                    both ways, sorted by the owner range of the first of each
  labels  (T tasks, owner ranges,   clustering, see below: the smallest member of each document's
           in rounds)               component, per document of the task's own range
  decide  (T tasks, owner ranges)   removed documents of the range -> their keeper (an exact copy: its
                                    first's keeper); how many each keeper got, sorted by keeper's owner
  sizes   (T tasks, owner ranges)   adds up the counts for its keepers; one decision file per shard
  cluster (1 task)                  the summary (counts only) that marks the decision complete
Phase 3 (curation._merge_source) is the filter per shard: it reads that shard's decision file.
curation.py runs the stages on a local process pool, data_prep/cluster.py as datatrove tasks (local
or Slurm); a unit's output is written under a temporary name and renamed, so a killed task redoes
only its unfinished units.

The merge of a key range reads, from every shard's sorted run, the slice between two keys (found by a
binary search in a memory map that is closed again, ~log2(n) pages; the slice read by file offset, so no
descriptor stays open per shard) for a sub-range sized to CHUNK_RECORDS records in all, sorts the
concatenation and hands it on; hash keys are uniform, so a task's memory is bounded by the chunk, not by
the corpus, and every record is read exactly once.
The representative of a group is its smallest global index (source order, file, line), as in
find_duplicates: a bucket's pairs are (member, smallest alive member), components are labelled by their
smallest member, and an exact copy points at the final keeper of the copy it repeats.

Clustering without one process holding every pair. Owner range r is the documents of a contiguous run of
shards (plan.owner_shards), so a task's memory is bounded by its range: its labels (8 bytes per
document), its edges (the distinct similar pairs touching it) and what it looks up for them, never the
corpus. Every document has a label, at first itself. Round 0 reads the task's slice of every band unit's
pair folder (each pair file is read once in all) and sets label(u) = min(u, its neighbours). Each later
round, per document u of the range, with the labels L of the round before:
  - u's label becomes the smallest of L(u), the L(w) of its neighbours w, and the labels that the round
    before sent to u;
  - hooking: when a neighbour's label is smaller, it is also sent to the document L(u) (to its owner, in
    a message folder sorted by owner range), so a whole tree of documents moves at once;
  - pointer jumping: the label becomes min(label, L(label)), which halves the distance a label has left
    to travel.
Labels of other ranges are read from their round files through one memory map at a time; only a
range's own round files and messages of two rounds back are deleted. A round that changes no label and
sends nothing ends the rounds (label_state). Then every edge joins equal labels, so a component has one
label c, c = L(c) from the jump, and its smallest member m has L(m) <= m, so c = m: the label is the
component's smallest member, exactly what smallest_in_component gives find_duplicates over the same
pairs. Labels only ever decrease to members of the component, so the rounds end; pointer jumping makes
them few (a path of 1000 documents in random order: 17 rounds, tests/test_data_prep_dedup_stages.py; the
planted corpus of benchmarks/bench_dedup_scale.py: a handful). The round count is not known in advance:
every executor runs rounds until settled (under datatrove, one task runs them all, each round's ranges
on its own process pool, data_prep/cluster.py), at most MAX_LABEL_ROUNDS per run, and decide stops
with an error if the labels have not settled (running again resumes the rounds). A task killed
mid-round redoes its range's round; the others have nothing to do until it is finished.

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

from kumihimo.core.files import TEMP_MARK, temp_dir, temp_file_beside, write_text_atomic
from kumihimo.data_prep.config import DataPrepConfig, DedupConfig
from kumihimo.data_prep.minhash import (
    KEEP,
    QUALITY_DROPPED,
    band_keys,
    estimated_jaccard,
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
# the alive stage's exact copies (sorted) and the first of each, read in slices by the decide units
EXACT_MEMBERS, EXACT_FIRSTS = "exact_members.npy", "exact_firsts.npy"
_SIMILAR, _FORWARD = 1, 2  # a band unit's pair records: passed min_jaccard; (left, right), not swapped


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
        """A folder: the unit's pairs both ways, sorted by the owner range of their first member."""
        band, part = unit
        return self.folder / "pairs" / f"band-{band:03d}-range-{part:05d}-of-{self.num_band_parts:05d}"

    def owner_shards(self, owner: int) -> range:
        """The shards whose documents owner range `owner` (of num_tasks) labels and decides."""
        num = len(self.shard_dirs)
        return range(owner * num // self.num_tasks, (owner + 1) * num // self.num_tasks)

    def owner_bounds(self) -> np.ndarray:
        """Global index of each owner range's first document (and the total last)."""
        num = len(self.shard_dirs)
        return self.offsets()[[o * num // self.num_tasks for o in range(self.num_tasks + 1)]]

    def labels_dir(self, owner: int) -> Path:
        return self.folder / "labels" / f"owner-{owner:05d}-of-{self.num_tasks:05d}"

    def label_path(self, owner: int, round_: int) -> Path:
        return self.labels_dir(owner) / f"round-{round_:05d}.npy"

    def message_path(self, owner: int, round_: int) -> Path:
        return self.labels_dir(owner) / f"messages-{round_:05d}"

    def counts_path(self, owner: int) -> Path:
        return self.folder / "counts" / f"owner-{owner:05d}-of-{self.num_tasks:05d}"

    def removed_path(self, shard_dir: Path) -> Path:
        return self.folder / "removed" / f"{shard_dir.name}.npz"

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
    plan.folder.mkdir(parents=True, exist_ok=True)
    _save_npy(plan.folder / EXACT_MEMBERS, copies_of[order])
    _save_npy(plan.folder / EXACT_FIRSTS, firsts[order])
    _save_npz(  # last: its presence marks the stage done
        plan.alive_path,
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
    if plan.band_path(unit).is_dir():
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
    flags = similar.astype(np.uint8)
    both = _by_owner(
        plan.owner_bounds(),
        np.concatenate((left, right)),
        np.concatenate((left, right)),
        np.concatenate((right, left)),
        np.concatenate((flags | _FORWARD, flags)),
    )
    _save_dir(plan.band_path(unit), **both)
    return counter.num_bytes


def _count_distinct_pairs(left: np.ndarray, right: np.ndarray) -> int:
    if not len(left):
        return 0
    order = np.lexsort((right, left))
    left, right = left[order], right[order]
    return 1 + int(np.count_nonzero((left[1:] != left[:-1]) | (right[1:] != right[:-1])))


def _open_array(path: Path) -> np.ndarray:
    """An .npy file as a read-only memory map (an empty one cannot be mapped: read instead)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:
        return np.load(path)


def _slices(path: Path, owner: int) -> Iterator[np.ndarray]:
    """Owner `owner`'s slice of each array of an owner-partitioned folder (starts.npy: T + 1 offsets),
    read by file offset: an owner reads its part of every sender's file and nothing else."""
    starts = np.load(path / "starts.npy")
    lo, hi = int(starts[owner]), int(starts[owner + 1])
    for name in sorted(p.name for p in path.glob("[a-z]*.npy")):
        if name != "starts.npy":
            yield _Vector.of(path / name, None).read(lo, hi)


def _by_owner(bounds: np.ndarray, index: np.ndarray, *arrays: np.ndarray) -> dict[str, np.ndarray]:
    """`arrays` sorted by the owner of `index` (stably) and the owners' starts, for _save_dir."""
    owner = np.searchsorted(bounds, index, side="right") - 1
    order = np.argsort(owner, kind="stable")
    starts = np.concatenate(([0], np.cumsum(np.bincount(owner, minlength=len(bounds) - 1))))
    out = {f"a{i}": a[order] for i, a in enumerate(arrays)}
    out["starts"] = starts.astype(np.int64)
    return out


def _save_dir(path: Path, **arrays: np.ndarray) -> None:
    """One .npy per array in a staging folder renamed onto `path`: the folder's presence marks the unit
    done (its arrays can then be read in slices by offset, which an .npz member cannot)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{TEMP_MARK}*"):  # a killed attempt at this unit
        for leftover in stale.iterdir():
            leftover.unlink()
        stale.rmdir()
    staging = temp_dir(path.parent, f".{path.name}{TEMP_MARK}")
    try:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array)
        os.replace(staging, path)
    except BaseException:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
        raise


def _save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- clustering: min labels over owner ranges, in rounds -------------------------------------------


@dataclass(frozen=True)
class LabelState:
    """Where the label rounds stand: `done` = the last round every owner finished (-1: none), and
    whether it changed no label (the components are found)."""

    done: int
    converged: bool


def label_state(plan: DedupPlan) -> LabelState:
    finished = []
    for owner in range(plan.num_tasks):
        rounds = [int(p.stem.split("-")[1]) for p in plan.labels_dir(owner).glob("round-*.npy")]
        finished.append(max(rounds, default=-1))
    done = min(finished)
    if done < 0:
        return LabelState(done, False)
    changed = sum(
        json.loads(plan.label_path(o, done).with_suffix(".json").read_text())["changed"]
        for o in range(plan.num_tasks)
    )
    return LabelState(done, changed == 0)


def _labels_of(plan: DedupPlan, done: int, index: np.ndarray, owner: int, own: np.ndarray) -> np.ndarray:
    """The labels of round `done` of `index` (any owners'): this owner's from memory, the others' from
    their files, one memory map at a time (closed again, so a task's memory holds no other owner's)."""
    bounds = plan.owner_bounds()
    whose = np.searchsorted(bounds, index, side="right") - 1
    order = np.argsort(whose, kind="stable")
    cuts = np.searchsorted(whose[order], np.arange(plan.num_tasks + 1))
    out = np.empty(len(index), dtype=np.int64)
    for other in np.flatnonzero(np.diff(cuts)):
        at = order[cuts[other] : cuts[other + 1]]
        local = index[at] - bounds[other]
        if other == owner:
            out[at] = own[local]
        else:
            labels = np.load(plan.label_path(int(other), done), mmap_mode="r")
            out[at] = labels[local]
            del labels
    return out


def _save_round(plan: DedupPlan, owner: int, round_: int, labels: np.ndarray, changed: int) -> None:
    path = plan.label_path(owner, round_)
    write_text_atomic(path.with_suffix(".json"), json.dumps({"changed": changed}))
    _save_npy(path, labels)  # last: its presence marks the round done for this owner


def _gather_edges(plan: DedupPlan, owner: int) -> tuple[np.ndarray, np.ndarray]:
    """This owner's slice of every band unit's pairs, read once (the round-0 unit): the distinct
    similar pairs, both ways (u in this range), and the count of distinct candidate pairs it owns."""
    path = plan.labels_dir(owner) / "edges.npz"
    if not path.is_file():
        us, ws, fl = [np.empty(0, np.int64)], [np.empty(0, np.int64)], [np.empty(0, np.uint8)]
        for unit in plan.band_units():
            u, w, flags = _slices(plan.band_path(unit), owner)
            us.append(u), ws.append(w), fl.append(flags)
        u, w, flags = np.concatenate(us), np.concatenate(ws), np.concatenate(fl)
        forward = (flags & _FORWARD) != 0
        num_pairs = _count_distinct_pairs(u[forward], w[forward])
        similar = (flags & _SIMILAR) != 0
        u, w = u[similar], w[similar]
        if len(u):
            order = np.lexsort((w, u))
            u, w = u[order], w[order]
            distinct = np.concatenate(([True], (u[1:] != u[:-1]) | (w[1:] != w[:-1])))
            u, w = u[distinct], w[distinct]
        _save_npz(path, u=u, w=w, num_pairs=np.int64(num_pairs))
    with np.load(path) as edges:
        return edges["u"], edges["w"]


def labels_unit(plan: DedupPlan, owner: int) -> int:
    """One round for the documents of one owner range (see the module docstring). Round 0 reads the
    pairs. Nothing once the labels are settled. Returns the bytes read."""
    state = label_state(plan)
    round_ = state.done + 1
    if state.converged or plan.label_path(owner, round_).is_file():
        return 0
    lo, hi = (int(b) for b in plan.owner_bounds()[owner : owner + 2])
    u, w = _gather_edges(plan, owner)
    if round_ == 0:
        labels = np.arange(lo, hi, dtype=np.int64)
        np.minimum.at(labels, u - lo, w)
        _save_round(plan, owner, 0, labels, int(np.count_nonzero(labels != np.arange(lo, hi))))
        return u.nbytes + w.nbytes
    old = np.load(plan.label_path(owner, state.done))
    read = u.nbytes + w.nbytes + old.nbytes + 8 * (len(w) + len(old))
    labels = old.copy()
    if round_ > 1:  # the smaller labels sent to this range's labels in the round before
        for sender in range(plan.num_tasks):
            candidate, target = _slices(plan.message_path(sender, state.done), owner)
            np.minimum.at(labels, target - lo, candidate)
            read += candidate.nbytes + target.nbytes
    theirs = _labels_of(plan, state.done, w, owner, old)
    np.minimum.at(labels, u - lo, theirs)
    # hooking: a neighbour's smaller label is sent to u's label too, so that a whole tree moves at once
    target, candidate = old[u - lo], theirs
    lower = candidate < target
    target, candidate = target[lower], candidate[lower]
    if len(target):
        order = np.lexsort((candidate, target))
        target, candidate = target[order], candidate[order]
        first = np.concatenate(([True], target[1:] != target[:-1]))
        target, candidate = target[first], candidate[first]
    labels = np.minimum(labels, _labels_of(plan, state.done, labels, owner, old))  # pointer jumping
    parts = _by_owner(plan.owner_bounds(), target, candidate, target)
    _save_dir(
        plan.message_path(owner, round_), candidate=parts["a0"], target=parts["a1"], starts=parts["starts"]
    )
    _save_round(plan, owner, round_, labels, int(np.count_nonzero(labels != old)) + len(target))
    stale = plan.label_path(owner, state.done - 1)  # no one reads round done - 1 any more
    stale.unlink(missing_ok=True)
    stale.with_suffix(".json").unlink(missing_ok=True)
    _remove_dir(plan.message_path(owner, state.done - 1))
    return read


def _remove_dir(path: Path) -> None:
    if path.is_dir():
        for leftover in path.iterdir():
            leftover.unlink()
        path.rmdir()


def final_round(plan: DedupPlan) -> int:
    """The round whose labels are the components; an error saying what to do if they have not settled."""
    state = label_state(plan)
    if not state.converged:
        raise RuntimeError(
            f"dedup: the cluster labels are not settled after round {state.done} (at most "
            f"{MAX_LABEL_ROUNDS} rounds a run) in {plan.folder}; run the curation again: it resumes the "
            "label rounds where they stopped"
        )
    return state.done


def decide_unit(plan: DedupPlan, owner: int) -> None:
    """The documents of one owner range that dedup removes and the kept document each points at; their
    counts per kept document, sorted by the owner of that document (the sizes stage adds them up)."""
    if plan.counts_path(owner).is_dir():
        return
    done = final_round(plan)
    bounds, offsets = plan.owner_bounds(), plan.offsets()
    lo, hi = int(bounds[owner]), int(bounds[owner + 1])
    labels = np.load(plan.label_path(owner, done))
    near = np.flatnonzero(labels != np.arange(lo, hi)) + lo
    members = _open_array(plan.folder / EXACT_MEMBERS)
    a, b = np.searchsorted(members, [lo, hi])
    copies = np.array(members[a:b])
    firsts = np.array(_open_array(plan.folder / EXACT_FIRSTS)[a:b])
    del members
    # an exact copy points at its first's final keeper: the first's label (itself when it stays)
    index = np.concatenate((near, copies))
    target = np.concatenate((labels[near - lo], _labels_of(plan, done, firsts, owner, labels)))
    is_exact = np.concatenate((np.zeros(len(near), bool), np.ones(len(copies), bool)))
    order = np.argsort(index, kind="stable")
    index, target, is_exact = index[order], target[order], is_exact[order]
    passes = np.load(plan.alive_path)["passes"]
    for shard in plan.owner_shards(owner):
        start, end = int(offsets[shard]), int(offsets[shard + 1])
        i, j = np.searchsorted(index, [start, end])
        rows = np.arange(start, end)
        dropped = np.flatnonzero(~_bits(passes, rows)) if len(passes) else np.empty(0, np.int64)
        _save_npz(
            plan.removed_path(plan.shard_dirs[shard]),
            removed_rows=index[i:j] - start,
            removed_target=target[i:j],
            removed_is_exact=is_exact[i:j],
            quality_dropped_rows=dropped,
        )
    keepers, counts = np.unique(target, return_counts=True)
    with np.load(plan.labels_dir(owner) / "edges.npz") as edges:
        num_pairs = int(edges["num_pairs"])
    parts = _by_owner(bounds, keepers, keepers, counts.astype(np.int64))
    # the folder is renamed into place last: its presence marks the unit done
    write_text_atomic(
        plan.labels_dir(owner) / "stats.json", json.dumps({"removed": len(index), "pairs": num_pairs})
    )
    _save_dir(plan.counts_path(owner), keepers=parts["a0"], counts=parts["a1"], starts=parts["starts"])


def sizes_unit(plan: DedupPlan, owner: int) -> None:
    """Each shard's decision file: its removed rows and 1 + the documents removed in favour of each of
    its kept ones (counted by every owner range; this one reads its slice of each count file)."""
    shards = plan.owner_shards(owner)
    if all(plan.decision_path(plan.shard_dirs[s]).is_file() for s in shards):
        return
    keepers, counts = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for sender in range(plan.num_tasks):
        count, keeper = _slices(plan.counts_path(sender), owner)  # sorted names: counts, keepers
        keepers.append(keeper), counts.append(count)
    keepers_all, counts_all = np.concatenate(keepers), np.concatenate(counts)
    keepers_u, where = np.unique(keepers_all, return_inverse=True)
    totals = np.bincount(where, weights=counts_all, minlength=len(keepers_u)).astype(np.int64)
    offsets = plan.offsets()
    for shard in shards:
        shard_dir = plan.shard_dirs[shard]
        if plan.decision_path(shard_dir).is_file():
            continue
        start, end = int(offsets[shard]), int(offsets[shard + 1])
        k0, k1 = np.searchsorted(keepers_u, [start, end])
        with np.load(plan.removed_path(shard_dir)) as removed:
            _save_npz(
                plan.decision_path(shard_dir),
                **{name: removed[name] for name in removed.files},
                keeper_rows=keepers_u[k0:k1] - start,
                keeper_cluster_size=1 + totals[k0:k1],
            )


def cluster_step(plan: DedupPlan) -> None:
    """The summary that marks the whole decision complete (after every owner's sizes unit)."""
    if plan.summary_path.is_file():
        return
    stats = [json.loads((plan.labels_dir(o) / "stats.json").read_text()) for o in range(plan.num_tasks)]
    missing = [d.name for d in plan.shard_dirs if not plan.decision_path(d).is_file()]
    if missing:
        raise RuntimeError(f"dedup: no decision for shard {missing[0]} in {plan.folder}; run the sizes stage")
    offsets = plan.offsets()
    summary = {
        "num_documents": int(offsets[-1]),
        "num_removed": sum(s["removed"] for s in stats),
        "num_candidate_pairs": sum(s["pairs"] for s in stats),
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

STAGES = ("exact", "alive", "bands", "labels", "decide", "sizes", "cluster")
"""In order; "labels" is run again until label_state(plan).converged (each run one round)."""
ONE_TASK_STAGES = ("alive", "cluster")
# a run stops here (decide then says the labels are not settled); a path of d documents in one cluster
# settles in about 2 log2(d) rounds (17 for d = 1000, tests/test_data_prep_dedup_stages.py)
MAX_LABEL_ROUNDS = 64


def stage_runs(plan: DedupPlan, stage: str) -> Iterator[int]:
    """Yields before each run of a stage's units: once, or for "labels" until the labels settle."""
    for run in range(MAX_LABEL_ROUNDS if stage == "labels" else 1):
        if stage == "labels" and label_state(plan).converged:
            return
        yield run


def stage_units(plan: DedupPlan, stage: str) -> list:
    """The units of a stage; task `rank` of `world_size` runs units rank, rank + world_size, ..."""
    owners = list(range(plan.num_tasks))
    return {
        "exact": plan.exact_units(),
        "alive": [None],
        "bands": plan.band_units(),
        "labels": owners,
        "decide": owners,
        "sizes": owners,
        "cluster": [None],
    }[stage]


def run_unit(plan: DedupPlan, stage: str, unit, passes: np.ndarray | None = None) -> int:
    """One unit of a stage (skipped when its output is there); returns the bytes it read. `passes`
    matters to the alive stage only."""
    if stage == "exact":
        return exact_unit(plan, unit)
    if stage == "bands":
        return band_unit(plan, unit)
    if stage == "labels":
        return labels_unit(plan, unit)
    if stage == "decide":
        decide_unit(plan, unit)
    elif stage == "sizes":
        sizes_unit(plan, unit)
    elif stage == "alive":
        alive_step(plan, passes)
    elif stage == "cluster":
        cluster_step(plan)
    return 0

"""Exact and fuzzy (MinHash + LSH) deduplication.

Per shard, each document gets a 64-bit exact key and a MinHash signature over character n-grams;
one global pass then groups equal keys, and LSH bands over the signatures of what is left. Within a
group (connected component) the document with the smallest global index (source order, file, line)
is kept. n-grams are hashed once per document; the bands x rows permutations (multiply-add-shift
hashing) are applied one at a time to the n-grams of a cache-sized group of documents.
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from kumihimo.data_prep.config import DedupConfig
from kumihimo.data_prep.ngrams import codepoints, mix64, window_hashes

KEEP = -1  # duplicate_of of a kept document
QUALITY_DROPPED = -2  # duplicate_of of a carried document that a refilter's thresholds drop
# shingles hashed per permutation pass: 512 KiB of uint64 stays in the L2 cache through multiply, add
# and min (2^16 measured fastest in benchmarks/bench_minhash.py; 2^12 is 2.5x slower from call overhead)
_GROUP_SHINGLES = 1 << 16
_BAND_MULT = np.uint64(0x9E3779B97F4A7C15)


def normalize_for_dedup(text: str) -> str:
    """NFKC, lower case, no whitespace: copies differing only in width, case or spacing compare equal."""
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def exact_key(text: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=8).digest(), "little"
    )


class MinHasher:
    """MinHash signatures (uint32, bands x rows long) over character n-grams."""

    def __init__(self, config: DedupConfig):
        self.ngram_size = config.ngram_size
        self.num_perm = config.num_bands * config.rows_per_band
        rng = np.random.default_rng(config.seed)
        self.mult = rng.integers(0, 2**64, size=self.num_perm, dtype=np.uint64) | np.uint64(1)
        self.add = rng.integers(0, 2**64, size=self.num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the document's n-grams (the whole text if it is shorter than n)."""
        cps = codepoints("".join(text.lower().split()))
        n = min(self.ngram_size, len(cps)) or 1
        hashes = window_hashes(cps, n) if len(cps) else mix64(np.zeros(1, dtype=np.uint64))
        return hashes >> np.uint64(32)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), bands x rows) uint32 signatures."""
        per_doc = [self.shingles(t) for t in texts]
        sig = np.empty((len(per_doc), self.num_perm), dtype=np.uint32)
        d0 = 0
        while d0 < len(per_doc):
            d1, num_shingles = d0 + 1, len(per_doc[d0])
            while d1 < len(per_doc) and num_shingles + len(per_doc[d1]) <= _GROUP_SHINGLES:
                num_shingles += len(per_doc[d1])
                d1 += 1
            sig[d0:d1] = self._group_signatures(per_doc[d0:d1])
            d0 = d1
        return sig

    def _group_signatures(self, per_doc: list[np.ndarray]) -> np.ndarray:
        """Signatures of a few documents whose shingles fit in the cache, one permutation at a time.

        Every document has at least one shingle, so the reduceat segments are never empty. A scalar
        multiply-add over one contiguous array and a 1-D segmented min run at SIMD speed; the former
        (shingles x permutations) blocks spent most of their time in a 2-D reduceat.
        """
        lengths = np.fromiter(map(len, per_doc), dtype=np.int64, count=len(per_doc))
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        flat = np.concatenate(per_doc)
        values = np.empty_like(flat)
        mins = np.empty((self.num_perm, len(per_doc)), dtype=np.uint64)
        for i, (mult, add) in enumerate(zip(self.mult, self.add)):
            np.multiply(flat, mult, out=values)
            values += add
            np.minimum.reduceat(values, starts, out=mins[i])
        return (mins.T >> np.uint64(32)).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal signature entries (row-wise for 2-D input): an unbiased Jaccard estimate."""
    return np.mean(sig_a == sig_b, axis=-1)


def catch_probability(jaccard: float, num_bands: int, rows_per_band: int) -> float:
    """P(an LSH band collides) for a pair with this Jaccard: 1 - (1 - J^r)^b."""
    return 1.0 - (1.0 - jaccard**rows_per_band) ** num_bands


@dataclass
class DedupDecision:
    duplicate_of: np.ndarray  # int64 per document: KEEP or the global index of the kept document
    is_exact: np.ndarray  # bool per document: dropped as an exact (not near) duplicate
    num_candidate_pairs: int


def _group_firsts(keys: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For equal keys: (members, the first member of their group), members excluding the firsts."""
    order = np.lexsort((index, keys))
    sorted_keys = keys[order]
    new_group = np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))
    group_first = index[order][np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))]
    members = ~new_group
    return index[order][members], group_first[members]


def band_keys(band_columns: np.ndarray) -> np.ndarray:
    """64-bit key of one LSH band (its `rows` signature columns) per document: equal keys, same bucket."""
    cols = np.asarray(band_columns, dtype=np.uint64)
    key = np.zeros(len(cols), dtype=np.uint64)
    for j in range(cols.shape[1]):
        key = mix64(key * _BAND_MULT + cols[:, j])
    return key


def smallest_in_component(num: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Smallest member of each node's connected component (min-label propagation, vectorised)."""
    labels = np.arange(num, dtype=np.int64)
    while True:
        new = labels.copy()
        np.minimum.at(new, left, labels[right])
        np.minimum.at(new, right, labels[left])
        new = new[new]
        if np.array_equal(new, labels):
            return labels
        labels = new


def find_duplicates(
    exact_keys: np.ndarray, signatures: np.ndarray | None, config: DedupConfig
) -> DedupDecision:
    """Global decision over all candidates in global-index order (rows of both arrays)."""
    num_docs = len(exact_keys)
    duplicate_of = np.full(num_docs, KEEP, dtype=np.int64)
    is_exact = np.zeros(num_docs, dtype=bool)
    everyone = np.arange(num_docs, dtype=np.int64)
    if config.exact and num_docs:
        members, firsts = _group_firsts(exact_keys.astype(np.uint64), everyone)
        duplicate_of[members] = firsts
        is_exact[members] = True
    num_pairs = 0
    if config.fuzzy and signatures is not None and num_docs:
        alive = np.nonzero(duplicate_of == KEEP)[0]
        rows = config.rows_per_band
        lefts, rights = [], []
        for band in range(config.num_bands):
            key = band_keys(signatures[alive, band * rows : (band + 1) * rows])
            members, firsts = _group_firsts(key, np.arange(len(alive), dtype=np.int64))
            lefts.append(members)
            rights.append(firsts)
        left = np.concatenate(lefts) if lefts else np.empty(0, np.int64)
        right = np.concatenate(rights) if rights else np.empty(0, np.int64)
        if len(left):
            pairs = np.unique(np.stack([left, right], axis=1), axis=0)
            left, right = pairs[:, 0], pairs[:, 1]
        num_pairs = len(left)
        if config.min_jaccard is not None and num_pairs:
            similar = (
                estimated_jaccard(np.asarray(signatures[alive[left]]), np.asarray(signatures[alive[right]]))
                >= config.min_jaccard
            )
            left, right = left[similar], right[similar]
        labels = smallest_in_component(len(alive), left, right)
        near = labels != np.arange(len(alive))
        duplicate_of[alive[near]] = alive[labels[near]]
        # an exact copy of a document that then lost as a near duplicate points at the final keeper
        exact_rows = np.nonzero(is_exact)[0]
        pointed = duplicate_of[exact_rows]
        chained = duplicate_of[pointed] != KEEP
        duplicate_of[exact_rows[chained]] = duplicate_of[pointed[chained]]
    return DedupDecision(duplicate_of, is_exact, num_pairs)

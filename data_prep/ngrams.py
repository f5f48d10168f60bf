"""Vectorised n-gram hashing shared by the repetition filters, MinHash and decontamination.

Texts become integer arrays (Unicode code points, or per-document word ids); every window of n
items is hashed in one numpy pass (polynomial hash, then a 64-bit mixer so that similar windows get
unrelated hashes). Arithmetic wraps modulo 2**64 on purpose.
"""

from __future__ import annotations

import numpy as np

_POLY = np.uint64(0x100000001B3)  # odd multiplier for the polynomial window hash
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def codepoints(text: str) -> np.ndarray:
    """The text as a uint32 array of code points (no copy of the encoded buffer)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise: a bijection that spreads every input bit over the output."""
    z = values.astype(np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def window_hashes(items: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of all len(items)-n+1 windows of n consecutive items (empty if too short)."""
    num_windows = len(items) - n + 1
    if num_windows <= 0:
        return np.empty(0, dtype=np.uint64)
    values = items.astype(np.uint64) + np.uint64(1)  # +1 so that item 0 still changes the hash
    acc = values[:num_windows].copy()
    for k in range(1, n):
        acc *= _POLY
        acc += values[k:k + num_windows]
    return mix64(acc)


def top_ngram_coverage(items: np.ndarray, weights: np.ndarray, n: int) -> float:
    """Share of total weight covered by occurrences of the most frequent n-gram (Gopher's rule)."""
    hashes = window_hashes(items, n)
    total = float(weights.sum())
    if len(hashes) == 0 or total <= 0:
        return 0.0
    uniq, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    if counts.max() < 2:
        return 0.0
    top = np.argmax(counts)
    cum = np.concatenate(([0], np.cumsum(weights, dtype=np.float64)))
    window_weight = cum[n:] - cum[:-n]
    return float(window_weight[inverse == top].sum()) / total


def duplicate_ngram_coverage(items: np.ndarray, weights: np.ndarray, n: int) -> float:
    """Share of total weight inside n-grams that repeat an earlier n-gram (first occurrences do not
    count, overlapping repeats count each item once), as in Gopher's duplicate n-gram fraction."""
    hashes = window_hashes(items, n)
    total = float(weights.sum())
    if len(hashes) == 0 or total <= 0:
        return 0.0
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    starts = np.nonzero(first[inverse] != np.arange(len(hashes)))[0]
    if len(starts) == 0:
        return 0.0
    length = len(items)
    depth = np.cumsum(np.bincount(starts, minlength=length + 1) - np.bincount(starts + n, minlength=length + 1))
    covered = depth[:length] > 0
    return float(weights[covered].sum()) / total

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


def bounded_runs(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive runs of items whose sizes add up to at most `budget` (an item larger
    than that alone), so that work vectorised over joined items needs bounded memory."""
    runs, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            runs.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        runs.append((start, len(sizes)))
    return runs


def codepoints(text: str) -> np.ndarray:
    """The text as a uint32 array of code points (no copy of the encoded buffer); lone surrogates, which a
    Python str can hold (JSON escapes), pass through instead of raising."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


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
    if n > _PREFIX_FROM:
        return mix64(_window_sums(values, n))
    acc = values[:num_windows].copy()
    for k in range(1, n):
        acc *= _POLY
        acc += values[k : k + num_windows]
    return mix64(acc)


# Above this n, window sums come from prefix sums (4 passes) instead of n - 1 multiply-add passes.
_PREFIX_FROM = 6


def _window_sums(values: np.ndarray, n: int) -> np.ndarray:
    """The Horner sums of the n-windows, sum_k values[i+k] * P**(n-1-k), from prefix sums.

    With S_j = sum_{k<j} values[k] * P**-k, (S_{i+n} - S_i) * P**(i+n-1) is that sum exactly: the
    arithmetic is modulo 2**64 and P is odd, hence invertible.
    """
    forward, inverse = powers(len(values))
    prefix = np.empty(len(values) + 1, dtype=np.uint64)
    prefix[0] = 0
    np.cumsum(values * inverse[: len(values)], dtype=np.uint64, out=prefix[1:])
    sums = prefix[n:] - prefix[:-n]
    sums *= forward[n - 1 : len(values)]
    return sums


_POWER_CACHE: list[np.ndarray] = []


def powers(num: int) -> tuple[np.ndarray, np.ndarray]:
    """(P**k, P**-k) modulo 2**64 for k < num, P the window-hash multiplier (cached, grown by doubling)."""
    if not _POWER_CACHE or len(_POWER_CACHE[0]) < num:
        size = max(num, 2 * len(_POWER_CACHE[0]) if _POWER_CACHE else 4096)
        forward = np.full(size, _POLY, dtype=np.uint64)
        backward = np.full(size, pow(int(_POLY), -1, 2**64), dtype=np.uint64)
        forward[0] = backward[0] = 1
        _POWER_CACHE[:] = [np.cumprod(forward, dtype=np.uint64), np.cumprod(backward, dtype=np.uint64)]
    return _POWER_CACHE[0], _POWER_CACHE[1]


def _extend(values: np.ndarray, acc: np.ndarray, n: int) -> np.ndarray:
    """Unmixed polynomial hashes of the n-grams from those of the (n-1)-grams (`acc`)."""
    num_windows = len(values) - n + 1
    out = acc[:num_windows] * _POLY
    out += values[n - 1 : n - 1 + num_windows]
    return out


def _raw_hashes(items: np.ndarray, n: int) -> np.ndarray:
    values = items.astype(np.uint64) + np.uint64(1)
    acc = values
    for k in range(2, n + 1):
        acc = _extend(values, acc, k)
    return acc


def _top_coverage(
    raw: np.ndarray, weights: np.ndarray, n: int, total: float, uniform: bool = False
) -> tuple[float, int]:
    """(coverage of the most frequent n-gram, its count) from unmixed window hashes.

    Among n-grams tied for the top count, the one with the smallest mixed hash is taken (what a sort
    of the mixed hashes picks first); the mixer is applied to the tied few only. With unit weights
    (`uniform`) every occurrence weighs exactly n, so the coverage is n x count whichever is taken.
    """
    if len(raw) == 0 or total <= 0:
        return 0.0, 0
    ordered = np.sort(raw)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    runs = np.diff(np.append(starts, len(ordered)))
    top_count = int(runs.max())
    if top_count < 2:
        return 0.0, top_count
    if uniform:  # the same float as summing top_count window weights of n.0 (integers, exact)
        return float(n * top_count) / total, top_count
    tied = ordered[starts[runs == top_count]]
    top = tied[np.argmin(mix64(tied))] if len(tied) > 1 else tied[0]
    cum = np.concatenate(([0], np.cumsum(weights, dtype=np.float64)))
    window_weight = cum[n:] - cum[:-n]
    return float(window_weight[raw == top].sum()) / total, top_count


def _duplicate_coverage(raw: np.ndarray, weights: np.ndarray, n: int, total: float) -> float:
    if len(raw) == 0 or total <= 0:
        return 0.0
    order = np.argsort(raw, kind="stable")  # equal hashes keep text order: all but the first are repeats
    ordered = raw[order]
    starts = order[1:][ordered[1:] == ordered[:-1]]
    if len(starts) == 0:
        return 0.0
    length = len(weights)
    depth = np.cumsum(
        np.bincount(starts, minlength=length + 1) - np.bincount(starts + n, minlength=length + 1)
    )
    covered = depth[:length] > 0
    return float(weights[covered].sum()) / total


def top_ngram_coverage(items: np.ndarray, weights: np.ndarray, n: int) -> float:
    """Share of total weight covered by occurrences of the most frequent n-gram (Gopher's rule)."""
    return _top_coverage(_raw_hashes(items, n), weights, n, float(weights.sum()))[0]


def duplicate_ngram_coverage(items: np.ndarray, weights: np.ndarray, n: int) -> float:
    """Share of total weight inside n-grams that repeat an earlier n-gram (first occurrences do not
    count, overlapping repeats count each item once), as in Gopher's duplicate n-gram fraction."""
    return _duplicate_coverage(_raw_hashes(items, n), weights, n, float(weights.sum()))


def ngram_coverages(items: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """Gopher's n-gram values for n = 2..10, as top_ngram_coverage (n <= 4) and duplicate_ngram_coverage
    (n >= 5) give them, from window hashes extended n by n (one pass per n instead of n)."""
    values = items.astype(np.uint64) + np.uint64(1)
    total = float(weights.sum())
    uniform = bool(np.all(weights == 1.0))
    out: dict[str, float] = {}
    acc = values
    for n in range(2, 11):
        acc = _extend(values, acc, n)
        if n <= 4:
            out[f"top_{n}gram_character_fraction"] = _top_coverage(acc, weights, n, total, uniform)[0]
        else:
            out[f"duplicate_{n}gram_character_fraction"] = _duplicate_coverage(acc, weights, n, total)
    return out

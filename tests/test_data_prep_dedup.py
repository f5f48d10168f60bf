"""MinHash + LSH and exact dedup, on pairs with constructed (known) Jaccard similarity."""

from __future__ import annotations

import numpy as np
import pytest

from kumihimo.data_prep import minhash
from kumihimo.data_prep.config import DedupConfig
from kumihimo.data_prep.minhash import (
    KEEP,
    MinHasher,
    catch_probability,
    estimated_jaccard,
    exact_key,
    find_duplicates,
)

NUM_SHINGLES = 400  # per document: 404 distinct characters -> 400 distinct 5-grams


def pair_with_shared_shingles(shared: int, base: int) -> tuple[str, str, float]:
    """Two texts of distinct CJK characters whose 5-gram sets share exactly `shared` shingles."""
    length = NUM_SHINGLES + 4
    prefix = shared + 4  # windows entirely inside the common prefix are the shared ones
    a = [chr(base + i) for i in range(length)]
    b = a[:prefix] + [chr(base + length + i) for i in range(length - prefix)]
    jaccard = shared / (2 * NUM_SHINGLES - shared)
    return "".join(a), "".join(b), jaccard


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    sa = {a[i : i + n] for i in range(len(a) - n + 1)}
    sb = {b[i : i + n] for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


@pytest.mark.parametrize("target", [0.9, 0.7, 0.5, 0.2])
def test_estimated_jaccard_matches_the_constructed_value(target):
    shared = round(2 * NUM_SHINGLES * target / (1 + target))
    a, b, jaccard = pair_with_shared_shingles(shared, 0x4E00)
    assert shingle_jaccard(a, b) == pytest.approx(jaccard)
    hasher = MinHasher(DedupConfig(num_bands=32, rows_per_band=8))
    sig = hasher.signatures([a, b])
    # 256 permutations: standard error sqrt(J(1-J)/256) <= 0.032
    assert estimated_jaccard(sig[0], sig[1]) == pytest.approx(jaccard, abs=0.1)


def test_lsh_decisions_follow_the_s_curve():
    config = DedupConfig(num_bands=20, rows_per_band=10)
    assert catch_probability(0.9, 20, 10) > 0.999
    assert catch_probability(0.5, 20, 10) < 0.02
    texts, levels = [], []
    for _ in range(5):
        for target in (0.95, 0.85, 0.5, 0.2):
            shared = round(2 * NUM_SHINGLES * target / (1 + target))
            a, b, _ = pair_with_shared_shingles(shared, 0x4E00 + 1000 * len(levels))
            texts += [a, b]
            levels.append(target)
    hasher = MinHasher(config)
    sigs = hasher.signatures(texts)
    keys = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    decision = find_duplicates(keys, sigs, config)
    for pair, target in enumerate(levels):
        a, b = 2 * pair, 2 * pair + 1
        caught = decision.duplicate_of[b] == a
        assert decision.duplicate_of[a] == KEEP
        if target >= 0.85:
            assert caught, f"pair at J={target} missed"
        elif target <= 0.2:
            assert not caught, f"pair at J={target} wrongly merged"
    num_half_caught = sum(decision.duplicate_of[2 * p + 1] != KEEP for p, t in enumerate(levels) if t == 0.5)
    assert num_half_caught <= 1
    assert not decision.is_exact.any()


def test_signatures_do_not_depend_on_batching(monkeypatch):
    texts = ["東京都の天気は晴れ", "abc", "", "短", "長い" * 300, "Hello   World  again and again"]
    hasher = MinHasher(DedupConfig())
    together = hasher.signatures(texts)
    monkeypatch.setattr(minhash, "_GROUP_SHINGLES", 10)  # groups of one or two documents
    split = hasher.signatures(texts)
    one_by_one = np.concatenate([hasher.signatures([t]) for t in texts])
    assert np.array_equal(together, split) and np.array_equal(together, one_by_one)
    # case and whitespace do not matter to shingles
    assert np.array_equal(hasher.signatures(["hello world"]), hasher.signatures(["Hello  World"]))


def test_signatures_are_the_multiply_add_shift_minimum(monkeypatch):
    # the definition, one document at a time: min over shingles of (a*h + b mod 2**64), top 32 bits
    texts = ["", "短", "東京都の天気は晴れ。" * 40, "abc def", "x" * 5000]
    hasher = MinHasher(DedupConfig(num_bands=4, rows_per_band=3))
    expected = np.stack(
        [
            ((hasher.shingles(t)[:, None] * hasher.mult + hasher.add).min(axis=0) >> np.uint64(32)).astype(
                np.uint32
            )
            for t in texts
        ]
    )
    assert np.array_equal(hasher.signatures(texts), expected)
    monkeypatch.setattr(minhash, "_GROUP_SHINGLES", 1)  # every document its own group
    assert np.array_equal(hasher.signatures(texts), expected)
    assert hasher.signatures([]).shape == (0, 12)


def test_exact_dedup_keeps_the_first_and_ignores_width_case_and_spacing():
    texts = ["東京タワーに行った。", "ＡＢＣ", "東京 タワーに 行った。", "abc", "別の文章です。"]
    keys = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    decision = find_duplicates(keys, None, DedupConfig(fuzzy=False))
    assert decision.duplicate_of.tolist() == [KEEP, KEEP, 0, 1, KEEP]
    assert decision.is_exact.tolist() == [False, False, True, True, False]
    assert (
        find_duplicates(keys, None, DedupConfig(exact=False, fuzzy=False)).duplicate_of.tolist() == [KEEP] * 5
    )


def test_clusters_keep_their_smallest_index_and_exact_copies_follow_it():
    base = [chr(0x4E00 + i) for i in range(404)]
    a = "".join(base)
    b = "".join(base[:-10] + [chr(0x6000 + i) for i in range(10)])  # J(a, b) ~ 0.95
    c = "".join(base[:-20] + [chr(0x7000 + i) for i in range(20)])  # J(b, c) ~ 0.93
    texts = [b, c, b, a]  # a comes last, so b (index 0) keeps the cluster
    config = DedupConfig()
    sigs = MinHasher(config).signatures(texts)
    keys = np.array([exact_key(t) for t in texts], dtype=np.uint64)
    decision = find_duplicates(keys, sigs, config)
    assert decision.duplicate_of.tolist() == [KEEP, 0, 0, 0]
    assert decision.is_exact.tolist() == [False, False, True, False]


def test_min_jaccard_filters_lsh_candidates():
    shared = round(2 * NUM_SHINGLES * 0.8 / 1.8)
    a, b, _ = pair_with_shared_shingles(shared, 0x4E00)
    loose = DedupConfig(num_bands=40, rows_per_band=5)
    sigs = MinHasher(loose).signatures([a, b])
    keys = np.array([exact_key(a), exact_key(b)], dtype=np.uint64)
    assert find_duplicates(keys, sigs, loose).duplicate_of.tolist() == [KEEP, 0]
    strict = DedupConfig(num_bands=40, rows_per_band=5, min_jaccard=0.95)
    assert find_duplicates(keys, sigs, strict).duplicate_of.tolist() == [KEEP, KEEP]

"""Offline language identification: script checks first, then py3langid's bundled model.

Kana only occur in Japanese, so a text with enough of them is `ja` whatever the statistical model
says (it labels kanji-heavy Japanese `zh` or `wuu`); Hangul likewise marks Korean.
"""

from __future__ import annotations

import warnings
from array import array
from functools import lru_cache

import numpy as np

from kumihimo.data_prep import charclass
from kumihimo.data_prep.config import LangIdConfig
from kumihimo.data_prep.ngrams import bounded_runs, codepoints

_BATCH_BYTES = 1 << 22  # bytes counted in one pass by FeatureCounter.counts_batch (~200 MB of int64 arrays)
_SELF_TEST = (
    "Das Wetter ist heute schön. The weather is nice today. 今日はいい天気です。 Ça va très bien, merci! "
    "Сегодня хорошая погода. 오늘은 날씨가 좋다."
)


class FeatureCounter:
    """py3langid's byte n-gram feature counts for a whole text in a few numpy gathers.

    py3langid walks its automaton one byte at a time in Python (~0.4 us a byte). Its states are nodes
    of a trie at most `depth` bytes deep (the longest suffix of the input read so far that is a
    node), so the state after byte i depends only on the last `depth` bytes: starting from the root
    `depth` bytes earlier reaches the same state. All positions therefore advance together, `depth`
    steps in all. Counts come back in first-occurrence order, as py3langid's Counter has them, so the
    scores are bit-identical.
    """

    def __init__(self, nextmove, rows, output):
        self.nextmove = (
            np.frombuffer(nextmove, dtype=np.uint32)
            if isinstance(nextmove, array)
            else np.asarray(nextmove, dtype=np.uint32)
        )
        self.rowbase = np.asarray(rows, dtype=np.int64) << 8
        self.output = np.asarray(output, dtype=np.int64)
        self.num_features = int(self.output.max()) + 1
        self.depth = self._trie_depth()
        self.batchable = self._resets_on_ff()  # counts_batch may join texts with 0xFF bytes

    def _trie_depth(self) -> int:
        """Breadth-first search from the root. States share rows of the transition table (38k rows for
        100k states), and the targets of a row expanded once are all reached by then, so each row is
        expanded at most once (25 ms instead of 0.2 s for every state's 256 transitions)."""
        rows = self.rowbase >> 8
        num_rows = len(self.nextmove) // 256
        transitions = self.nextmove[: num_rows * 256].reshape(num_rows, 256)
        seen = np.zeros(len(rows), dtype=bool)
        seen[0] = True
        expanded = np.zeros(num_rows, dtype=bool)
        frontier, depth = np.zeros(1, dtype=np.int64), 0
        while True:
            new_rows = np.zeros(num_rows, dtype=bool)
            new_rows[rows[frontier]] = True
            new_rows &= ~expanded
            expanded |= new_rows
            reached = np.zeros(len(rows), dtype=bool)
            reached[transitions[new_rows].ravel()] = True
            frontier = np.flatnonzero(reached & ~seen)
            if len(frontier) == 0:
                return depth
            seen[frontier] = True
            depth += 1

    def states(self, data: bytes) -> np.ndarray:
        """The automaton state after each byte of `data`."""
        values = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        num, depth = len(values), self.depth
        states = np.zeros(num, dtype=np.int64)
        state = 0
        for i in range(min(depth - 1, num)):  # the first bytes: walk from the start of the text
            state = int(self.nextmove[self.rowbase[state] + values[i]])
            states[i] = state
        if num >= depth:
            current = np.zeros(num - depth + 1, dtype=np.int64)
            for k in range(depth):
                current = self.nextmove[self.rowbase[current] + values[k : num - depth + 1 + k]].astype(
                    np.int64
                )
            states[depth - 1 :] = current
        return states

    def counts(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids, counts), features in order of first occurrence.

        One plain sort of (feature, position) keys replaces a stable argsort: within a feature the
        first key holds its first position, and run lengths are the counts.
        """
        features = self.output[self.states(data)]
        positions = np.flatnonzero(features >= 0)
        if len(positions) == 0:
            return positions, positions
        num = len(data)
        keys = features[positions] * num + positions
        keys.sort()
        ids = keys // num
        starts = np.flatnonzero(np.diff(ids, prepend=-1))
        counts = np.diff(starts, append=len(keys))
        by_first = np.argsort(keys[starts] - ids[starts] * num)  # first positions: distinct
        return ids[starts][by_first], counts[by_first]

    def _resets_on_ff(self) -> bool:
        """True when byte 0xFF (never in UTF-8) leads every state back to the featureless root."""
        return bool(np.all(self.nextmove[self.rowbase + 0xFF] == 0)) and self.output[0] < 0

    def counts_batch(self, texts: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
        """counts() of every text, for all of them in one pass: the texts are joined with depth - 1
        bytes 0xFF before each, which take any state back to the root, so every position sees the
        state py3langid reaches from the start of its own text. Keys (text, feature, position) sort
        the features of each text together, and their first positions order them as counts() does."""
        if not self.batchable or not texts:
            return [self.counts(t) for t in texts]
        runs = bounded_runs([len(t) for t in texts], _BATCH_BYTES)
        if len(runs) > 1:
            return [result for start, end in runs for result in self.counts_batch(texts[start:end])]
        pad = b"\xff" * (self.depth - 1)
        joined = pad + pad.join(texts)
        num, depth, num_features = len(joined), self.depth, self.num_features
        if len(texts) > 1 and len(texts) * num_features * num >= 2**62:  # keys would overflow int64: halve
            half = len(texts) // 2
            return self.counts_batch(texts[:half]) + self.counts_batch(texts[half:])
        values = np.frombuffer(joined, dtype=np.uint8).astype(np.int64)
        current = np.zeros(num - depth + 1, dtype=np.int64)
        for k in range(depth):
            current = self.nextmove[self.rowbase[current] + values[k : num - depth + 1 + k]].astype(np.int64)
        features = self.output[current]  # the state of position depth - 1 + i; pads have none
        positions = np.flatnonzero(features >= 0)
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + (depth - 1)
        starts = np.cumsum(lengths) - lengths  # of each text's pad, in `current` coordinates
        doc = np.searchsorted(starts, positions, side="right") - 1
        keys = (doc * num_features + features[positions]) * num + positions
        keys.sort()
        ids = keys // num
        run_starts = np.flatnonzero(np.diff(ids, prepend=-1))
        run_counts = np.diff(run_starts, append=len(keys))
        first = keys[run_starts] - ids[run_starts] * num
        by_first = np.argsort(first)  # distinct positions, increasing by text, then first occurrence
        ids, run_counts = ids[run_starts][by_first], run_counts[by_first]
        bounds = np.searchsorted(ids // num_features, np.arange(len(texts) + 1))
        feature_ids = ids % num_features
        return [(feature_ids[lo:hi], run_counts[lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:])]


@lru_cache(maxsize=1)
def _identifier():
    # Loading the model takes ~1 s; once per process.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier, visit_counts

    class VectorisedIdentifier(LanguageIdentifier):
        counter: FeatureCounter | None = None
        table: tuple[np.ndarray, np.ndarray] | None = None  # (nb_ptc, the same as float32)
        # (text, its encoding, feature ids, counts) computed by classify_batch for the text being classified
        prepared: tuple[str, bytes, np.ndarray, np.ndarray] | None = None

        def classify_batch(self, texts: list[str]) -> list[tuple[str, float]]:
            """classify() of every text, with the byte n-gram features of all of them counted at once.
            py3langid's own classify runs for each text; only its encoding and feature counts are handed
            in (matched by object identity, so anything else py3langid may do still happens)."""
            if self.counter is None:
                return [self.classify(t) for t in texts]
            encoded = [self._encode(t) for t in texts]
            results = []
            for text, data, (features, counts) in zip(texts, encoded, self.counter.counts_batch(encoded)):
                self.prepared = (text, data, features, counts)
                try:
                    results.append(self.classify(text))
                finally:
                    self.prepared = None
            return results

        def _encode(self, text):
            prepared = self.prepared
            if prepared is not None and prepared[0] is text:
                return prepared[1]
            return LanguageIdentifier._encode(text)

        def _raw_score(self, text):
            if self.counter is None:
                return super()._raw_score(text)
            prepared = self.prepared
            if prepared is not None and prepared[1] is text:
                features, counts = prepared[2], prepared[3]
            else:
                features, counts = self.counter.counts(text)
            if len(features) == 0:
                return super()._raw_score(text)
            # numpy multiplies float32 by float16 without BLAS (15x slower) and widens float16 slowly, so
            # the table is widened once (exactly: every float16 is a float32), 57 MB per process
            if self.table is None or self.table[0] is not self.nb_ptc:
                self.table = (self.nb_ptc, np.asarray(self.nb_ptc, dtype=np.float32))
            return np.log1p(counts.astype(np.float32)) @ self.table[1][features] + self.nb_pc

    identifier = VectorisedIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    try:  # py3langid internals: use them only if they are what this code was written against
        counter = FeatureCounter(identifier.tk_nextmove, identifier.tk_row, identifier.tk_output)
        sample = _SELF_TEST.encode("utf-8")
        expected = visit_counts(identifier.tk_nextmove, identifier._rowbase, identifier.tk_output, sample)
        features, counts = counter.counts(sample)
        if list(expected.items()) == list(zip(features.tolist(), counts.tolist())):
            identifier.counter = counter
        pieces = [sample[:40], b"", sample, sample[7:]]
        counter.batchable = counter.batchable and all(
            np.array_equal(f, g) and np.array_equal(c, d)
            for (f, c), (g, d) in zip(counter.counts_batch(pieces), map(counter.counts, pieces))
        )
    except (AttributeError, TypeError, ValueError):
        pass
    if identifier.counter is None:
        warnings.warn(
            "py3langid internals changed: language ID falls back to its slower byte loop", stacklevel=2
        )
    return identifier


def script_counts(text: str) -> tuple[int, int, int]:
    """(letters, kana, hangul) in `text`: one lookup of every code point in a class table."""
    num_letters, num_kana, num_hangul = charclass.counts(
        charclass.flag_counts(codepoints(text)), (charclass.LETTER, charclass.KANA, charclass.HANGUL)
    )
    return num_letters, num_kana, num_hangul


def identify_batch(texts: list[str], config: LangIdConfig) -> list[tuple[str, float]]:
    """identify() of every text: script counts for all samples from one class-table lookup, and the
    texts py3langid labels scored with their features counted together (classify_batch)."""
    samples = [text[: config.sample_chars] for text in texts]
    flags = charclass.table()[codepoints("".join(samples))]
    ends = np.cumsum(np.fromiter(map(len, samples), dtype=np.int64, count=len(samples)))
    per_text = []
    for flag in (charclass.LETTER, charclass.KANA, charclass.HANGUL):
        totals = np.concatenate(([0], np.cumsum((flags & flag) != 0)))[ends]
        per_text.append(np.diff(totals, prepend=0).tolist())
    results: list[tuple[str, float] | None] = [None] * len(texts)
    statistical = []
    for i, (num_letters, num_kana, num_hangul) in enumerate(zip(*per_text)):
        script = _script_label(num_letters, num_kana, num_hangul, config)
        if script is not None:
            results[i] = script, 1.0
        else:
            statistical.append(i)
    labels = _identifier().classify_batch([samples[i] for i in statistical]) if statistical else []
    for i, (lang, score) in zip(statistical, labels):
        results[i] = _label(lang, score)
    return results  # type: ignore[return-value]


def _script_label(num_letters: int, num_kana: int, num_hangul: int, config: LangIdConfig) -> str | None:
    if num_letters and num_kana / num_letters >= config.min_kana_ratio:
        return "ja"
    if num_letters and num_hangul / num_letters >= 0.3:
        return "ko"
    return None


def _label(lang: str, score) -> tuple[str, float]:
    if lang == "wuu":  # Wu Chinese: what the model says for kanji-only snippets; treat as Chinese
        lang = "zh"
    return lang, float(score)


def identify(text: str, config: LangIdConfig) -> tuple[str, float]:
    """(ISO 639-1 code, confidence). Script rules give confidence 1.0."""
    sample = text[: config.sample_chars]
    script = _script_label(*script_counts(sample), config)
    if script is not None:
        return script, 1.0
    return _label(*_identifier().classify(sample))

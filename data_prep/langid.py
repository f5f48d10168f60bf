"""Offline language identification: script checks first, then py3langid's bundled model.

Kana only occur in Japanese, so a text with enough of them is `ja` whatever the statistical model
says (it labels kanji-heavy Japanese `zh` or `wuu`); Hangul likewise marks Korean.
"""

from __future__ import annotations

import warnings
from array import array
from functools import lru_cache

import numpy as np

from data_prep import charclass
from data_prep.config import LangIdConfig
from data_prep.ngrams import codepoints

_SELF_TEST = ("Das Wetter ist heute schön. The weather is nice today. 今日はいい天気です。 Ça va très bien, merci! "
              "Сегодня хорошая погода. 오늘은 날씨가 좋다.")


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
        self.nextmove = np.frombuffer(nextmove, dtype=np.uint32) if isinstance(nextmove, array) \
            else np.asarray(nextmove, dtype=np.uint32)
        self.rowbase = np.asarray(rows, dtype=np.int64) << 8
        self.output = np.asarray(output, dtype=np.int64)
        self.depth = self._trie_depth()

    def _trie_depth(self) -> int:
        seen = np.zeros(len(self.rowbase), dtype=bool)
        seen[0] = True
        frontier, depth = np.zeros(1, dtype=np.int64), 0
        while True:
            reached = np.zeros(len(self.rowbase), dtype=bool)
            reached[self.nextmove[(self.rowbase[frontier][:, None] + np.arange(256)).ravel()]] = True
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
                current = self.nextmove[self.rowbase[current] + values[k:num - depth + 1 + k]].astype(np.int64)
            states[depth - 1:] = current
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


@lru_cache(maxsize=1)
def _identifier():
    # Loading the model takes ~1 s; once per process.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier, visit_counts

    class VectorisedIdentifier(LanguageIdentifier):
        counter: FeatureCounter | None = None
        table: tuple[np.ndarray, np.ndarray] | None = None  # (nb_ptc, the same as float32)

        def _raw_score(self, text):
            if self.counter is None:
                return super()._raw_score(text)
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
    except (AttributeError, TypeError, ValueError):
        pass
    if identifier.counter is None:
        warnings.warn("py3langid internals changed: language ID falls back to its slower byte loop", stacklevel=2)
    return identifier


def script_counts(text: str) -> tuple[int, int, int]:
    """(letters, kana, hangul) in `text`: one lookup of every code point in a class table."""
    hist = charclass.flag_counts(codepoints(text))
    return (charclass.count(hist, charclass.LETTER), charclass.count(hist, charclass.KANA),
            charclass.count(hist, charclass.HANGUL))


def identify(text: str, config: LangIdConfig) -> tuple[str, float]:
    """(ISO 639-1 code, confidence). Script rules give confidence 1.0."""
    sample = text[: config.sample_chars]
    num_letters, num_kana, num_hangul = script_counts(sample)
    if num_letters and num_kana / num_letters >= config.min_kana_ratio:
        return "ja", 1.0
    if num_letters and num_hangul / num_letters >= 0.3:
        return "ko", 1.0
    lang, score = _identifier().classify(sample)
    if lang == "wuu":  # Wu Chinese: what the model says for kanji-only snippets; treat as Chinese
        lang = "zh"
    return lang, float(score)

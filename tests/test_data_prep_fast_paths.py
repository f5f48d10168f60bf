"""The vectorised fast paths of data_prep give exactly what their plain definitions give."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pytest

from data_prep import charclass, decontam
from data_prep.langid import _identifier
from data_prep.ngrams import codepoints, mix64, window_hashes
from data_prep.repair import _BLANK_RUNS, _SPACE_RUNS, _TRAILING_SPACE, clean_whitespace

TRICKY = ["", " ", "a", "東京都の天気は晴れ。明日も晴れ。", "a_b c1 ２３ ＡＢ x²", "İstanbul ǅ ﬁ ß ẞ Σ ΟΔΟΣ",
          "\ud800abc def", "tab\there  \u00a0 nbsp \n\n\n\nend  \n", "word-word, (quoted) «ok» … 123 4.5",
          "한국어 텍스트 and English", "x" * 40]


def horner_window_hashes(items: np.ndarray, n: int) -> np.ndarray:
    values = items.astype(np.uint64) + np.uint64(1)
    num = len(values) - n + 1
    if num <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = values[:num].copy()
    for k in range(1, n):
        acc = acc * np.uint64(0x100000001B3) + values[k:k + num]
    return mix64(acc)


@pytest.mark.parametrize("n", [1, 2, 5, 6, 7, 13, 25])
def test_window_hashes_from_prefix_sums_equal_horner(n):
    rng = np.random.default_rng(n)
    for length in (0, 1, n - 1, n, n + 1, 3000):
        items = rng.integers(0, 0x110000, size=max(length, 0)).astype(np.uint32)
        assert np.array_equal(window_hashes(items, n), horner_window_hashes(items, n))
        wide = rng.integers(0, 2**63, size=max(length, 0), dtype=np.uint64)  # word hashes: 64-bit items
        assert np.array_equal(window_hashes(wide, n), horner_window_hashes(wide, n))


def test_class_table_word_and_letter_flags_are_the_regexes():
    every_char = "".join(map(chr, range(0x110000)))
    table = charclass.table()
    for flag, pattern in ((charclass.WORD, r"\w"), (charclass.LETTER, r"[^\W\d_]")):
        expected = np.zeros(0x110000, dtype=bool)
        expected[[m.start() for m in re.finditer(pattern, every_char)]] = True
        assert np.array_equal((table & flag) != 0, expected)


@pytest.mark.parametrize("text", TRICKY)
def test_decontamination_ngrams_equal_the_findall_definition(text):
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
    for n in (1, 3, 25):
        assert np.array_equal(decontam.char_ngram_hashes(text, n), window_hashes(codepoints("".join(words)), n))
    for n in (1, 2, 13):
        expected = (window_hashes(decontam.word_hashes(words), n) ^ decontam._WORD_TAG if len(words) >= n
                    else np.empty(0, dtype=np.uint64))
        assert np.array_equal(decontam.word_ngram_hashes(text, n), expected)


@pytest.mark.parametrize("text", TRICKY + ["a \nb", "a\u00a0\nb", "a  b", "a\u00a0b", "\n\n\n", "a\tb\t\n"])
def test_whitespace_cleanup_skips_only_regexes_that_cannot_match(text):
    from data_prep.repair import _REMOVE

    plain = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    plain = _BLANK_RUNS.sub("\n\n", _TRAILING_SPACE.sub("\n", _SPACE_RUNS.sub(" ", plain.translate(_REMOVE))))
    assert clean_whitespace(text) == plain.strip()


def test_language_id_feature_counts_equal_py3langid():
    from py3langid.langid import visit_counts

    identifier = _identifier()
    assert identifier.counter is not None, "vectorised counter disabled (py3langid internals changed?)"
    for text in TRICKY + ["The weather is nice today, and the sky is clear." * 20]:
        data = text.encode("utf-8", "surrogatepass")
        expected = visit_counts(identifier.tk_nextmove, identifier._rowbase, identifier.tk_output, data) or {}
        features, counts = identifier.counter.counts(data)
        assert list(expected.items()) == list(zip(features.tolist(), counts.tolist()))


def test_lowering_a_whole_english_text_gives_the_same_stripped_words():
    # check_english lowers the text once: valid because no code point lowercases to or from whitespace
    # and no stripped punctuation is cased or produced by lowering (final sigma looks only across
    # case-ignorable characters, which whitespace is not)
    from data_prep.quality import _WORD_STRIP

    for code in range(0x110000):
        char = chr(code)
        lowered = char.lower()
        assert char.isspace() == any(c.isspace() for c in lowered) and (not char.isspace() or lowered == char)
        assert (char in _WORD_STRIP) == any(c in _WORD_STRIP for c in lowered)
    text = "The ΟΔΟΣ' «İstanbul» 'Σ (Hello), WORLD… ΣΑΣ. σ"
    assert [w.strip(_WORD_STRIP) for w in text.lower().split()] == [w.strip(_WORD_STRIP).lower()
                                                                   for w in text.split()]


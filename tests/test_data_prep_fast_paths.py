"""The vectorised fast paths of data_prep give exactly what their plain definitions give."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

import numpy as np
import pytest

from kumihimo.data_prep import charclass, decontam
from kumihimo.data_prep.langid import _identifier
from kumihimo.data_prep.ngrams import codepoints, mix64, window_hashes
from kumihimo.data_prep.repair import _BLANK_RUNS, _SPACE_RUNS, _TRAILING_SPACE, clean_whitespace

TRICKY = [
    "",
    " ",
    "a",
    "東京都の天気は晴れ。明日も晴れ。",
    "a_b c1 ２３ ＡＢ x²",
    "İstanbul ǅ ﬁ ß ẞ Σ ΟΔΟΣ",
    "\ud800abc def",
    "tab\there  \u00a0 nbsp \n\n\n\nend  \n",
    "word-word, (quoted) «ok» … 123 4.5",
    "한국어 텍스트 and English",
    "x" * 40,
]


def horner_window_hashes(items: np.ndarray, n: int) -> np.ndarray:
    values = items.astype(np.uint64) + np.uint64(1)
    num = len(values) - n + 1
    if num <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = values[:num].copy()
    for k in range(1, n):
        acc = acc * np.uint64(0x100000001B3) + values[k : k + num]
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
    assert charclass.every_character() == every_char
    table = charclass.table()
    for flag, pattern in ((charclass.WORD, r"\w"), (charclass.LETTER, r"[^\W\d_]")):
        expected = np.zeros(0x110000, dtype=bool)
        expected[[m.start() for m in re.finditer(pattern, every_char)]] = True
        assert np.array_equal((table & flag) != 0, expected)
    hist = charclass.flag_counts(codepoints("".join(TRICKY) + "ひらがなカタカナ漢字、。ｶﾀ"))
    flags = (
        charclass.LETTER,
        charclass.KANA,
        charclass.HANGUL,
        charclass.HIRAGANA,
        charclass.KATAKANA,
        charclass.KANJI,
        charclass.JA_PUNCT,
        charclass.WORD,
    )
    assert charclass.counts(hist, flags) == [charclass.count(hist, flag) for flag in flags]


@pytest.mark.parametrize("text", TRICKY)
def test_decontamination_ngrams_equal_the_findall_definition(text):
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
    for n in (1, 3, 25):
        assert np.array_equal(
            decontam.char_ngram_hashes(text, n), window_hashes(codepoints("".join(words)), n)
        )
    for n in (1, 2, 13):
        expected = (
            window_hashes(decontam.word_hashes(words), n) ^ decontam._WORD_TAG
            if len(words) >= n
            else np.empty(0, dtype=np.uint64)
        )
        assert np.array_equal(decontam.word_ngram_hashes(text, n), expected)


@pytest.mark.parametrize(
    "text",
    TRICKY
    + [
        "a \nb",
        "a\u00a0\nb",
        "a  b",
        "a\u00a0b",
        "\n\n\n",
        "a\tb\t\n",
        "a\x00b\x07\t\tc\u200bd\xad\x85e\ufeff\x7f f\x0b\x0c\x1f\u2060",
        "".join(map(chr, range(0x00, 0xA1))),
    ],
)
def test_whitespace_cleanup_skips_only_regexes_that_cannot_match(text):
    from kumihimo.data_prep.repair import _REMOVE

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


def test_language_id_trie_depth_is_the_plain_breadth_first_search():
    counter = _identifier().counter
    seen = np.zeros(len(counter.rowbase), dtype=bool)
    seen[0] = True
    frontier, depth = np.zeros(1, dtype=np.int64), 0
    while True:  # every state's 256 transitions, level by level
        reached = np.zeros(len(counter.rowbase), dtype=bool)
        reached[counter.nextmove[(counter.rowbase[frontier][:, None] + np.arange(256)).ravel()]] = True
        frontier = np.flatnonzero(reached & ~seen)
        if len(frontier) == 0:
            break
        seen[frontier] = True
        depth += 1
    assert counter.depth == depth


@pytest.mark.parametrize("batch_bytes", [1 << 22, 64])  # one pass; many (memory bound)
def test_language_id_of_a_batch_equals_one_text_at_a_time(batch_bytes, monkeypatch):
    from kumihimo.data_prep import langid
    from kumihimo.data_prep.config import LangIdConfig
    from kumihimo.data_prep.langid import identify, identify_batch

    monkeypatch.setattr(langid, "_BATCH_BYTES", batch_bytes)

    identifier = _identifier()
    assert identifier.counter.batchable
    texts = TRICKY + [
        "The weather is nice today, and the sky is clear." * 20,
        "Das Wetter ist schön. " * 9,
        "今日は" * 5,
        "x",
        "Ça va très bien, merci!",
        "\u00ff\u00fe" * 30,
        "ok" * 2000,
    ]
    data = [t.encode("utf-8", "surrogatepass") for t in texts]
    batch = identifier.counter.counts_batch(data)
    for one, (features, counts) in zip(data, batch):
        expected_features, expected_counts = identifier.counter.counts(one)
        assert np.array_equal(features, expected_features) and np.array_equal(counts, expected_counts)
    config = LangIdConfig(sample_chars=3000)
    assert identify_batch(texts, config) == [identify(t, config) for t in texts]  # bit-identical floats


def test_lowering_a_whole_english_text_gives_the_same_stripped_words():
    # check_english lowers the text once: valid because no code point lowercases to or from whitespace
    # and no stripped punctuation is cased or produced by lowering (final sigma looks only across
    # case-ignorable characters, which whitespace is not); it counts words with a letter on the lowered,
    # stripped words: valid because a character is alphabetic iff its lower case holds an alphabetic one;
    # and it takes word lengths from the lowered words unless the text holds U+0130
    from kumihimo.data_prep.quality import _WORD_STRIP

    assert not any(c.isalpha() for c in _WORD_STRIP)
    for code in range(0x110000):
        char = chr(code)
        lowered = char.lower()
        assert char.isspace() == any(c.isspace() for c in lowered) and (not char.isspace() or lowered == char)
        assert (char in _WORD_STRIP) == any(c in _WORD_STRIP for c in lowered)
        assert char.isalpha() == any(c.isalpha() for c in lowered)
        assert len(lowered) == 1 or char == "\u0130"  # check_english's mean word length from lowered words
    text = "The ΟΔΟΣ' «İstanbul» 'Σ (Hello), WORLD… ΣΑΣ. σ"
    assert [w.strip(_WORD_STRIP) for w in text.lower().split()] == [
        w.strip(_WORD_STRIP).lower() for w in text.split()
    ]


def test_ng_word_prefilter_never_hides_a_case_insensitive_match():
    from kumihimo.data_prep.config import FiltersConfig, NgWordConfig
    from kumihimo.data_prep.quality import QualityFilter

    words = ["casino", "Jackpot", "no deposit", "カジノ", "σοφία", "straße", "ǆ"]
    config = FiltersConfig(ng_words=NgWordConfig(words=words, max_matches=0, max_char_ratio=1.0))
    qf = QualityFilter(config)
    texts = TRICKY + [
        "CASINO",
        "caſino",
        "CAſINO",
        "jackpot",
        "JACKPOT",
        "casİno",
        "No Deposit",
        "no  deposit",
        "ΣΟΦΊΑ",
        "ΣΟΦΊΑΣ",
        "σοφία",
        "STRASSE",
        "STRAẞE",
        "Straße",
        "ǅ",
        "Ǆ",
        "ǆ",
        "ｶｼﾞﾉ",
        "カジノ",
        "jacKpot",
        "ca\u017fino and more",
    ]
    for text in texts:
        assert qf._ng_matches(text, text.lower()) == qf._ng.findall(text), text


def test_url_host_fast_path_agrees_with_urlsplit():
    from kumihimo.data_prep.config import FiltersConfig, UrlFilterConfig
    from kumihimo.data_prep.quality import QualityFilter

    qf = QualityFilter(FiltersConfig(urls=UrlFilterConfig(blocked_hosts=["spam.example.com", "bad.example"])))
    urls = [
        "https://spam.example.com/x",
        "HTTPS://SPAM.EXAMPLE.COM:8080/x",
        "http://user@www.bad.example/",
        "spam.example.com/page",
        "https://spam.exa\tmple.com/",
        "https://[::1]/spam.example.com",
        "https://good.example/?ref=spam.example.com",
        "https://notbad.example/",
        "https://ok.jp/",
    ]
    for url in urls:
        host = (urlsplit(url if "//" in url else "//" + url).hostname or "").lower()
        parts = host.split(".")
        expected = host if any(".".join(parts[i:]) in qf._blocked_hosts for i in range(len(parts))) else None
        assert qf.host_blocked(url) == expected, url


def test_ngram_coverages_equal_the_one_n_at_a_time_functions():
    from kumihimo.data_prep.ngrams import duplicate_ngram_coverage, ngram_coverages, top_ngram_coverage

    rng = np.random.default_rng(0)
    for trial in range(400):
        length = int(rng.integers(0, 120))
        vocab = int(rng.integers(1, 40))
        items = rng.integers(0, vocab, size=length).astype(np.uint32)
        if trial % 3 == 0 and length > 20:  # plant a repeated passage
            start, size = int(rng.integers(0, length // 2)), int(rng.integers(5, 12))
            items[length // 2 : length // 2 + size] = items[start : start + size][: length - length // 2]
        if trial % 2:
            weights = np.ones(length)
        else:
            weights = rng.integers(1, 12, size=vocab).astype(np.float64)[items]  # one weight per word
        expected = {
            f"top_{n}gram_character_fraction": top_ngram_coverage(items, weights, n) for n in (2, 3, 4)
        }
        expected.update(
            {
                f"duplicate_{n}gram_character_fraction": duplicate_ngram_coverage(items, weights, n)
                for n in range(5, 11)
            }
        )
        assert ngram_coverages(items, weights) == expected


def test_japanese_sentences_and_paragraphs_equal_the_per_line_definition():
    """The whole-text regex and the loose-terminator removal give what a per-line findall gives (the
    reference's definition: sentences per line, a paragraph = its line's sentences joined)."""
    import random
    import re

    from kumihimo.data_prep.ja_metrics import sentences_and_paragraphs

    per_line = re.compile(r"[^。．！？!?]+[。．！？!?]?")
    rng = random.Random(0)
    alphabet = ["。", "．", "！", "？", "!", "?", "\n", "a", " ", "あ", "\u3000", "\r", "…", "・"]
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        lines = [per_line.findall(line) for line in text.split("\n")]
        sentences = [s for line in lines for s in line]
        paragraphs = ["".join(line) for line in lines]
        assert sentences_and_paragraphs(text, count_blank_lines=True) == (sentences, paragraphs), repr(text)
        assert sentences_and_paragraphs(text, count_blank_lines=False) == (
            [s for s in sentences if s.strip()],
            [p for p in paragraphs if p.strip()],
        ), repr(text)


def _decontamination_one_at_a_time(text: str, eval_hashes: np.ndarray, config) -> str | None:
    """Decontaminator.check's definition, text by text, from the per-text n-gram hashes."""
    chars = decontam.uses_char_ngrams(text)
    n = config.char_ngram_size if chars else config.word_ngram_size
    hashes = decontam.char_ngram_hashes(text, n) if chars else decontam.word_ngram_hashes(text, n)
    shared = len(np.intersect1d(hashes, eval_hashes))
    if len(hashes) and shared >= config.min_matches:
        return f"{shared} {'char' if chars else 'word'} {n}-grams shared with evaluation data"
    return None


@pytest.mark.parametrize("batch_chars", [1 << 22, 64])  # one pass; many (memory bound)
def test_decontamination_of_a_batch_equals_one_text_at_a_time(batch_chars, monkeypatch):
    from kumihimo.data_prep.config import DecontamConfig

    monkeypatch.setattr(decontam, "_BATCH_CHARS", batch_chars)

    english = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat today. "
    japanese = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所で泣いていた。"
    texts = TRICKY + [
        english,
        "x " + english * 2,
        english[:40],
        japanese,
        "前置き" + japanese + japanese,
        japanese[:20],
        "Ｔｈｅ ＱＵＩＣＫ brown fox jumps over the lazy dog while the cat sleeps on the warm",
        english + japanese,
        "",
        "   ",
    ]
    for config in (
        DecontamConfig(),
        DecontamConfig(min_matches=3),
        DecontamConfig(word_ngram_size=3, char_ngram_size=4),
    ):
        eval_hashes = np.unique(
            np.concatenate(
                [
                    decontam.word_ngram_hashes(english, config.word_ngram_size),
                    decontam.char_ngram_hashes(japanese, config.char_ngram_size),
                ]
            )
        )
        expected = [_decontamination_one_at_a_time(t, eval_hashes, config) for t in texts]
        assert decontam.Decontaminator(eval_hashes, config).check_batch(texts) == expected
        assert any(expected[len(TRICKY) :])

"""Quality filters: Swallow-style character rules (ja), Gopher/C4 word rules (en), and shared rules.

Every rule returns a short reason (`ja_low_hiragana_ratio`) and a detail with the measured value, so
a drop record says why, with numbers. Boilerplate line removal is the only rule that edits text.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from itertools import filterfalse
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from kumihimo.data_prep import charclass
from kumihimo.data_prep.config import (
    EnglishFilterConfig,
    FiltersConfig,
    JapaneseFilterConfig,
    RepetitionConfig,
)
from kumihimo.data_prep.ngrams import codepoints, first_ngram_violation

Verdict = tuple[str, str] | None  # (reason, detail) when the document is dropped

_JA_SENTENCE_SPLIT = re.compile(r"(?<=[。！？!?])|\n")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")
_BULLETS = ("•", "●", "・", "-", "*", "‣", "◦", "▪", "■", "□", "○", "◆", "→")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_WORD_STRIP = ".,;:!?\"'()[]{}<>“”‘’«»…"
_URL_HARD = re.compile(r"[\[\t\r\n]")  # an IPv6 host, or characters urlsplit deletes (host_blocked)


def _read_list(path: str | None) -> list[str]:
    if path is None:
        return []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


@dataclass
class JapaneseCounts:
    num_chars: int
    num_hiragana: int
    num_katakana: int
    num_kanji: int
    num_ja_punct: int

    @property
    def num_japanese(self) -> int:
        return self.num_hiragana + self.num_katakana + self.num_kanji + self.num_ja_punct


def japanese_counts(cps: np.ndarray) -> JapaneseCounts:
    """Character class counts over a code point array (kana, kanji, Japanese punctuation)."""
    flags = (charclass.HIRAGANA, charclass.KATAKANA, charclass.KANJI, charclass.JA_PUNCT)
    return JapaneseCounts(len(cps), *charclass.counts(charclass.flag_counts(cps), flags))


def _duplicate_shares(units: list[str]) -> tuple[float, float]:
    """(share of units that repeat an earlier unit, share of characters in those repeats)."""
    if not units:
        return 0.0, 0.0
    seen: set[str] = set()
    num_dup = num_dup_chars = 0
    for unit in units:
        if unit in seen:
            num_dup += 1
            num_dup_chars += len(unit)
        else:
            seen.add(unit)
    total_chars = sum(len(u) for u in units) or 1
    return num_dup / len(units), num_dup_chars / total_chars


def check_repetition(
    lines: list[str],
    paragraphs: list[str],
    items: np.ndarray,
    weights: np.ndarray,
    config: RepetitionConfig,
    prefix: str,
) -> Verdict:
    """Gopher repetition rules over lines, paragraphs and n-grams of `items` (chars or word ids)."""
    line_share, line_char_share = _duplicate_shares(lines)
    if line_share > config.max_duplicate_line_ratio:
        return (
            f"{prefix}_duplicate_lines",
            f"{line_share:.2f} of lines repeat > {config.max_duplicate_line_ratio}",
        )
    if line_char_share > config.max_duplicate_line_char_ratio:
        return (
            f"{prefix}_duplicate_line_chars",
            f"{line_char_share:.2f} of chars in repeated lines > {config.max_duplicate_line_char_ratio}",
        )
    para_share, para_char_share = _duplicate_shares(paragraphs)
    if para_share > config.max_duplicate_paragraph_ratio:
        return (
            f"{prefix}_duplicate_paragraphs",
            f"{para_share:.2f} of paragraphs repeat > {config.max_duplicate_paragraph_ratio}",
        )
    if para_char_share > config.max_duplicate_paragraph_char_ratio:
        return (
            f"{prefix}_duplicate_paragraph_chars",
            f"{para_char_share:.2f} of chars in repeated paragraphs > {config.max_duplicate_paragraph_char_ratio}",
        )
    violation = first_ngram_violation(
        items,
        weights,
        dict(zip((2, 3, 4), config.max_top_ngram_ratio)),
        dict(zip(range(5, 11), config.max_duplicate_ngram_ratio)),
    )
    if violation is None:
        return None
    kind, n, share = violation
    if kind == "top":
        return (
            f"{prefix}_top_{n}gram",
            f"most frequent {n}-gram covers {share:.2f} > {config.max_top_ngram_ratio[n - 2]}",
        )
    return (
        f"{prefix}_duplicate_{n}grams",
        f"repeated {n}-grams cover {share:.2f} > {config.max_duplicate_ngram_ratio[n - 5]}",
    )


def japanese_sentences(text: str) -> list[str]:
    """Non-empty stripped pieces of `text` split after 。！？!? and at newlines. (The same as splitting with
    _JA_SENTENCE_SPLIT, whose look-behind tries every position: a newline after every terminator, then
    str.split, is several times faster.)"""
    for terminator in "。！？!?":
        if terminator in text:
            text = text.replace(terminator, terminator + "\n")
    return [s for s in (p.strip() for p in text.split("\n")) if s]


def check_japanese(
    text: str, cps: np.ndarray, counts: JapaneseCounts, config: JapaneseFilterConfig
) -> Verdict:
    n = counts.num_chars
    if n < config.min_chars:
        return "ja_too_short", f"{n} chars < {config.min_chars}"
    if n > config.max_chars:
        return "ja_too_long", f"{n} chars > {config.max_chars}"
    if counts.num_japanese < config.min_japanese_chars:
        return "ja_few_japanese_chars", f"{counts.num_japanese} Japanese chars < {config.min_japanese_chars}"
    checks = [
        ("ja_low_hiragana_ratio", counts.num_hiragana / n, config.min_hiragana_ratio, "<"),
        ("ja_high_katakana_ratio", counts.num_katakana / n, config.max_katakana_ratio, ">"),
        ("ja_low_japanese_ratio", counts.num_japanese / n, config.min_japanese_ratio, "<"),
    ]
    for reason, value, limit, direction in checks:
        if (value < limit) if direction == "<" else (value > limit):
            return reason, f"{value:.3f} {direction} {limit}"
    sentences = japanese_sentences(text)
    lengths = [len(s) for s in sentences] or [0]
    mean_len = sum(lengths) / len(lengths)
    if mean_len < config.min_mean_sentence_chars:
        return "ja_short_sentences", f"mean sentence {mean_len:.1f} chars < {config.min_mean_sentence_chars}"
    if mean_len > config.max_mean_sentence_chars:
        return "ja_long_sentences", f"mean sentence {mean_len:.1f} chars > {config.max_mean_sentence_chars}"
    if max(lengths) > config.max_sentence_chars:
        return "ja_sentence_too_long", f"a sentence of {max(lengths)} chars > {config.max_sentence_chars}"
    num_ellipsis = sum(1 for s in sentences if s.endswith(("…", "・")))
    if sentences and num_ellipsis / len(sentences) > config.max_ellipsis_sentence_ratio:
        return (
            "ja_ellipsis_sentences",
            f"{num_ellipsis / len(sentences):.2f} of sentences end in …/・ > {config.max_ellipsis_sentence_ratio}",
        )
    paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]
    return check_repetition(
        sentences, paragraphs, cps, np.ones(len(cps), dtype=np.float64), config.repetition, "ja"
    )


def check_english(text: str, config: EnglishFilterConfig) -> Verdict:
    # The words are split once, from the lowered text: lower() then split() gives the same words lowered
    # (no character lowercases to or from whitespace), and lowering changes a word's length only for
    # U+0130 (İ -> i + combining dot above).
    lowered_words = text.lower().split()
    num_words = len(lowered_words)
    if num_words < config.min_words:
        return "en_few_words", f"{num_words} words < {config.min_words}"
    if num_words > config.max_words:
        return "en_too_many_words", f"{num_words} words > {config.max_words}"
    mean_len = sum(map(len, lowered_words if "\u0130" not in text else text.split())) / num_words
    if not config.min_mean_word_length <= mean_len <= config.max_mean_word_length:
        return (
            "en_mean_word_length",
            f"{mean_len:.1f} outside [{config.min_mean_word_length}, {config.max_mean_word_length}]",
        )
    num_symbols = text.count("#") + text.count("...") + text.count("…")
    if num_symbols / num_words > config.max_symbol_word_ratio:
        return (
            "en_symbol_ratio",
            f"{num_symbols / num_words:.3f} symbols per word > {config.max_symbol_word_ratio}",
        )
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    bullet_share = sum(ln.startswith(_BULLETS) for ln in lines) / len(lines)
    if bullet_share > config.max_bullet_line_ratio:
        return "en_bullet_lines", f"{bullet_share:.2f} of lines are bullets > {config.max_bullet_line_ratio}"
    ellipsis_share = sum(ln.endswith(("...", "…")) for ln in lines) / len(lines)
    if ellipsis_share > config.max_ellipsis_line_ratio:
        return (
            "en_ellipsis_lines",
            f"{ellipsis_share:.2f} of lines end in ... > {config.max_ellipsis_line_ratio}",
        )
    # stripping the lowered words gives the stripped words lowered: none of _WORD_STRIP is cased (nor any
    # character's lower case)
    cleaned = [w.strip(_WORD_STRIP) for w in lowered_words]
    # A word has a letter iff its cleaned form has one (a character is alphabetic iff its lower case holds
    # an alphabetic one; _WORD_STRIP has none). str.isalpha (C) settles most words, the rest are scanned.
    num_alpha = sum(map(str.isalpha, cleaned))
    if num_alpha < num_words:
        num_alpha += sum(any(map(str.isalpha, w)) for w in filterfalse(str.isalpha, cleaned))
    alpha_share = num_alpha / num_words
    if alpha_share < config.min_alpha_word_ratio:
        return (
            "en_non_alpha_words",
            f"{alpha_share:.2f} of words have a letter < {config.min_alpha_word_ratio}",
        )
    first_use: dict[str, int] = {}  # word -> position of its first use
    first = np.fromiter(map(first_use.setdefault, cleaned, range(num_words)), dtype=np.int64, count=num_words)
    num_stop = sum(word in first_use for word in STOP_WORDS)
    if num_stop < config.min_stop_words:
        return "en_few_stop_words", f"{num_stop} distinct stop words < {config.min_stop_words}"
    # word ids in order of first use: the rank of a word's first position among all first positions
    ids = (np.cumsum(first == np.arange(num_words)) - 1)[first].astype(np.uint32)
    weights = np.fromiter(map(len, cleaned), dtype=np.float64, count=num_words)
    paragraphs = [p.strip() for p in _PARAGRAPH_SPLIT.split(text) if p.strip()]
    return check_repetition(lines, paragraphs, ids, weights, config.repetition, "en")


def _case_unsafe_characters(words: list[str]) -> str:
    """The characters that match a character p of `words` under re.IGNORECASE but whose str.lower() is not
    p (U+0130 İ, U+0131 ı and U+017F ſ for ASCII words), plus Σ, whose lower case depends on its
    neighbours. Without them, a case-insensitive match of a (lowered) word implies the word occurs in
    text.lower(). Found by matching every code point (~10 ms per process)."""
    chars = sorted(set("".join(words)))
    if not chars:
        return ""
    candidates = set(
        re.findall("[" + "".join(map(re.escape, chars)) + "]", charclass.every_character(), re.IGNORECASE)
    )
    return "".join(
        sorted(
            c
            for c in candidates
            if c == "\u03a3"
            or any(re.fullmatch(re.escape(p), c, re.IGNORECASE) and c.lower() != p for p in chars)
        )
    )


class QualityFilter:
    """All quality rules for one run; build once per worker (compiles the NG-word and host lists)."""

    def __init__(self, config: FiltersConfig):
        self.config = config
        bp = config.boilerplate
        self._line_patterns = [p.lower() for p in bp.line_patterns]
        self._doc_patterns = [p.lower() for p in bp.document_patterns]
        words = sorted(
            {w.lower() for w in [*config.ng_words.words, *_read_list(config.ng_words.words_file)]},
            key=len,
            reverse=True,
        )
        self._ng = re.compile("|".join(map(re.escape, words)), re.IGNORECASE) if words else None
        self._ng_words = words
        self._ng_unsafe = _case_unsafe_characters(words)
        hosts = [*config.urls.blocked_hosts, *_read_list(config.urls.blocked_hosts_file)]
        self._blocked_hosts = {h.lower().strip(".") for h in hosts}

    def host_blocked(self, url: str | None) -> str | None:
        if not url or not self._blocked_hosts:
            return None
        # An ASCII URL without '[' (IPv6 hosts), tab, CR or LF (which urlsplit deletes): its host, lowered,
        # is a substring of url.lower(), so a blocked suffix of it is too. Most URLs are settled here.
        if url.isascii() and not _URL_HARD.search(url):
            lowered = url.lower()
            if not any(h in lowered for h in self._blocked_hosts):
                return None
        host = (urlsplit(url if "//" in url else "//" + url).hostname or "").lower()
        parts = host.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in self._blocked_hosts:
                return host
        return None

    def strip_boilerplate(self, text: str, lowered: str | None = None) -> tuple[str, int, int]:
        """(text without boilerplate lines, lines removed, lines before); `lowered` = text.lower() if known."""
        if not self._line_patterns:
            return text, 0, 0
        lowered = text.lower() if lowered is None else lowered
        if not any(p in lowered for p in self._line_patterns):  # no line can hold one: skip the line scan
            return text.strip(), 0, text.count("\n") + 1
        lines = text.split("\n")
        kept = [ln for ln in lines if not any(p in ln.lower() for p in self._line_patterns)]
        return "\n".join(kept).strip(), len(lines) - len(kept), len(lines)

    def check(self, text: str, lang: str, url: str | None) -> tuple[str, Verdict, int]:
        """(text after boilerplate removal, verdict, number of boilerplate lines removed)."""
        config = self.config
        host = self.host_blocked(url)
        if host:
            return text, ("blocked_host", f"host {host} is on the block list"), 0
        lowered = text.lower()
        for pattern in self._doc_patterns:
            if pattern in lowered:
                return text, ("boilerplate_document", f"contains {pattern!r}"), 0
        text, num_removed, num_lines = self.strip_boilerplate(text, lowered)
        if num_removed and (not text or num_removed / num_lines > config.boilerplate.max_removed_line_ratio):
            return (
                text,
                ("boilerplate_lines", f"{num_removed} of {num_lines} lines are boilerplate"),
                num_removed,
            )
        if config.min_compression_ratio is not None or config.max_compression_ratio is not None:
            raw = text.encode("utf-8")
            ratio = len(zlib.compress(raw, 6)) / max(len(raw), 1)
            if config.min_compression_ratio is not None and ratio < config.min_compression_ratio:
                return (
                    text,
                    ("low_compression_ratio", f"{ratio:.2f} < {config.min_compression_ratio}"),
                    num_removed,
                )
            if config.max_compression_ratio is not None and ratio > config.max_compression_ratio:
                return (
                    text,
                    ("high_compression_ratio", f"{ratio:.2f} > {config.max_compression_ratio}"),
                    num_removed,
                )
        cps = codepoints(text)
        counts = japanese_counts(cps) if lang == "ja" else None
        # text is the stripped input unless lines were removed; then lowered no longer matches it
        verdict = self._check_ng_words(text, counts, lowered if not num_removed else text.lower())
        if verdict is None and lang == "ja" and config.ja.enabled:
            verdict = check_japanese(text, cps, counts, config.ja)
        elif verdict is None and lang == "en" and config.en.enabled:
            verdict = check_english(text, config.en)
        return text, verdict, num_removed

    def _check_ng_words(self, text: str, counts: JapaneseCounts | None, lowered: str) -> Verdict:
        """`lowered`: text.lower(), or the lowered text that `text` was stripped from."""
        if self._ng is None:
            return None
        # No match is possible unless a word occurs in the lowered text or the text holds a character that
        # matches a word's character case-insensitively but does not lower to it (_case_unsafe_characters).
        # A few substring scans instead of the case-insensitive alternation, which is 7x slower.
        if not any(w in lowered for w in self._ng_words) and not any(c in text for c in self._ng_unsafe):
            return None
        matches = self._ng.findall(text)
        num_matches = len(matches)
        if num_matches > self.config.ng_words.max_matches:
            return "ng_words", f"{num_matches} NG-word matches > {self.config.ng_words.max_matches}"
        # a single match never rejects (an NG substring inside an innocent word is common)
        if num_matches >= 2:
            denominator = counts.num_japanese if counts and counts.num_japanese else len(text)
            share = sum(len(m) for m in matches) / max(denominator, 1)
            if share >= self.config.ng_words.max_char_ratio:
                return (
                    "ng_word_chars",
                    f"NG words are {share:.3f} of the text >= {self.config.ng_words.max_char_ratio}",
                )
        return None

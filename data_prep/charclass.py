"""Per-code-point class flags, so that a text's letters, kana, kanji... are counted in one numpy pass.

One uint8 table over all of Unicode (1.1 MiB, built once per process in ~0.03 s from the regexes
themselves): indexing it with a text's code points and counting flags replaces a regex findall per
class, which builds a list of one-character strings and is several times slower.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

LETTER = 1  # what the regex [^\W\d_] matches: word characters that are neither digits nor '_'
KANA = 2  # hiragana, katakana, phonetic extensions, half-width katakana (the language-ID kana)
HANGUL = 4
HIRAGANA = 8  # U+3041..U+309F
KATAKANA = 16  # U+30A0..U+30FF, U+31F0..U+31FF, U+FF66..U+FF9F
KANJI = 32  # CJK unified ideographs (+ extension A, compatibility) and 々
JA_PUNCT = 64  # CJK symbols and punctuation (but 々), full-width forms up to U+FF65, ‥ …
WORD = 128  # what the regex \w matches (decontamination's words)

_RANGES = {
    KANA: [(0x3041, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9D)],
    HANGUL: [(0xAC00, 0xD7A3), (0x1100, 0x11FF)],
    HIRAGANA: [(0x3041, 0x309F)],
    KATAKANA: [(0x30A0, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)],
    KANJI: [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF), (0x3005, 0x3005)],
    JA_PUNCT: [(0x3000, 0x3004), (0x3006, 0x303F), (0xFF01, 0xFF65), (0x2025, 0x2026)],
}
# runs of matching characters: one match object per run instead of per character (4x faster to build)
_LETTER_RUNS = re.compile(r"[^\W\d_]+")
_WORD_RUNS = re.compile(r"\w+")


def every_character() -> str:
    """All code points 0..0x10FFFF in order, lone surrogates included, as one string (decoded from a
    numpy range in ~10 ms; "".join(map(chr, ...)) takes 0.1 s)."""
    return np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")


@lru_cache(maxsize=1)
def table() -> np.ndarray:
    """uint8 flags for every code point 0..0x10FFFF."""
    flags = np.zeros(0x110000, dtype=np.uint8)
    every_char = every_character()
    for flag, runs in ((LETTER, _LETTER_RUNS), (WORD, _WORD_RUNS)):
        for match in runs.finditer(every_char):
            flags[match.start() : match.end()] |= flag
    for flag, ranges in _RANGES.items():
        for first, last in ranges:
            flags[first : last + 1] |= flag
    return flags


def flag_counts(cps: np.ndarray) -> np.ndarray:
    """Histogram of the flag bytes of `cps` (256 bins); `count(hist, FLAG)` sums the bins with FLAG set."""
    return np.bincount(table()[cps], minlength=256)


_BINS_WITH = {
    flag: np.flatnonzero(np.arange(256) & flag)
    for flag in (LETTER, KANA, HANGUL, HIRAGANA, KATAKANA, KANJI, JA_PUNCT, WORD)
}


def count(hist: np.ndarray, flag: int) -> int:
    return int(hist[_BINS_WITH[flag]].sum())


_BITS = (np.arange(256)[:, None] >> np.arange(8)) & 1  # (flag byte, bit): 1 where the byte has the bit


def counts(hist: np.ndarray, flags: tuple[int, ...]) -> list[int]:
    """count(hist, flag) for each of `flags` (single bits), from one small matrix product."""
    per_bit = (hist @ _BITS).tolist()
    return [per_bit[flag.bit_length() - 1] for flag in flags]

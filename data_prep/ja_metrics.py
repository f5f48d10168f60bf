"""Japanese quality metrics as the Swallow corpus defines them (Okazaki et al., 2024), computed fast.

Every value here equals what Swallow's reference code (swallow-llm/swallow-corpus, quality.py) computes
for the same text, except where `count_blank_lines=False` (kumihimo's default) leaves out whitespace-only
units; benchmarks/check_swallow_agreement.py compares the two on real Japanese documents. Definitions,
for a text T of L characters:

  Japanese letters   hiragana U+3041..U+3096, katakana U+30A1..U+30FA, kanji (々 〇 〻, U+3400..U+9FFF,
                     U+F900..U+FAFF; not the astral extensions), kuten 。．！？ and toten 、，
  hiragana_fraction  hiragana / Japanese letters (katakana_fraction likewise); japanese_fraction =
                     Japanese letters / L
  sentences          within each line (split at "\\n"), maximal runs of characters other than 。．！？!?
                     plus the one terminator that follows, unstripped; paragraphs are the lines, each the
                     concatenation of its sentences (a terminator repeating a terminator is left out)
  avg/max_sentence_length over those sentences; ellipsis_fraction = share of sentences that end in ・ or …
                     once stripped
  duplicate_X_fraction           repeats of an earlier unit / units (X = paragraph, sentence)
  duplicate_X_fraction_in_character  characters in those repeats / characters in all units
  top_{n}gram_character_fraction (n = 2..4)  occurrences of the most frequent character n-gram / L-n+1
  duplicate_{n}gram_character_fraction (n = 5..10)  DISTINCT n-grams that occur more than once / distinct
                     n-grams (not the share of characters they cover, which flags most Japanese prose)

Where the reference raises (no sentence at all, texts shorter than n) the value here is 0. Character
n-grams are compared exactly (as pairs of ranks of shorter n-grams); in texts of 65536 characters or
more by 64-bit polynomial hashes (a collision between two different n-grams of one document is too
unlikely to matter).
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from kumihimo.data_prep.ngrams import _extend, codepoints

OTHER, HIRAGANA, KATAKANA, KANJI, KUTEN, TOTEN = range(6)
_TERMINATORS = "。．！？!?"
# one sentence: what the reference's per-line findall yields (here over the whole text, newline excluded)
_SENTENCE = re.compile(r"[^。．！？!?\n]+[。．！？!?]?")
# terminators that no sentence takes: at a line start, or after another terminator
_LOOSE_TERMINATORS = re.compile(r"(?:^|(?<=[。．！？!?]))[。．！？!?]+", re.MULTILINE)
_ELLIPSES = ("・", "…")
TOP_NGRAM_SIZES = (2, 3, 4)
DUPLICATE_NGRAM_SIZES = (5, 6, 7, 8, 9, 10)


@lru_cache(maxsize=1)
def _class_table() -> np.ndarray:
    table = np.zeros(0x110000, dtype=np.uint8)
    table[0x3041:0x3097] = HIRAGANA
    table[0x30A1:0x30FB] = KATAKANA
    table[0x3400:0xA000] = KANJI
    table[0xF900:0xFB00] = KANJI
    for char in "々〇〻":
        table[ord(char)] = KANJI
    for char in "。．！？":
        table[ord(char)] = KUTEN
    for char in "、，":
        table[ord(char)] = TOTEN
    return table


def letter_counts(cps: np.ndarray) -> list[int]:
    """[other, hiragana, katakana, kanji, kuten, toten] counts of a code point array."""
    return np.bincount(_class_table()[cps], minlength=6).tolist()


def duplicate_shares(units: list[str]) -> tuple[float, float]:
    """(repeats of an earlier unit / units, characters in repeats / characters in units); 0 when empty."""
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
    total_chars = sum(map(len, units))
    return num_dup / len(units), (num_dup_chars / total_chars if total_chars else 0.0)


# n-gram -> (rank of its first part, rank of the rest): ranks of shorter n-grams, 16 bits each
_SPLITS = {2: (1, 1), 3: (2, 1), 4: (2, 2), 5: (4, 1), 6: (4, 2), 7: (4, 3), 8: (4, 4), 9: (8, 1), 10: (8, 2)}
_RANKED = (2, 3, 4, 8)  # the n whose ranks longer n-grams are built from


def ngram_fractions(cps: np.ndarray) -> dict[str, float]:
    """The top and duplicate n-gram fractions, exactly: an n-gram is the pair (rank of its first part,
    rank of the rest), both ranks among the document's distinct shorter n-grams, packed in a uint32.
    Sorting uint32 keys is several times faster than sorting 64-bit hashes. Texts of 65536 characters
    or more (ranks above 16 bits) take the hashed path."""
    length = len(cps)
    if length >= 1 << 16:
        return _ngram_fractions_hashed(cps)
    ranks: dict[int, np.ndarray] = {}
    distinct = np.unique(cps)
    ranks[1] = np.searchsorted(distinct, cps).astype(np.uint32)
    out: dict[str, float] = {}
    for n in range(2, 11):
        num_windows = length - n + 1
        kind = "top" if n in TOP_NGRAM_SIZES else "duplicate"
        key_name = f"{kind}_{n}gram_character_fraction"
        if num_windows <= 0:
            out[key_name] = 0.0
            continue
        head, tail = _SPLITS[n]
        keys = (ranks[head][:num_windows] << np.uint32(16)) | ranks[tail][head : head + num_windows]
        ordered = np.sort(keys)
        same = ordered[1:] == ordered[:-1]  # True inside a run of equal n-grams
        if n in _RANKED:
            firsts = np.concatenate(([True], ~same))
            ranks[n] = np.searchsorted(ordered[firsts], keys).astype(np.uint32)
        if kind == "top":
            starts = np.flatnonzero(np.concatenate(([True], ~same, [True])))
            out[key_name] = int(np.diff(starts).max()) / num_windows
        else:
            num_distinct = num_windows - int(same.sum())
            num_repeated = int(same[:1].sum()) + int((same[1:] & ~same[:-1]).sum())
            out[key_name] = num_repeated / num_distinct
    return out


def _ngram_fractions_hashed(cps: np.ndarray) -> dict[str, float]:
    values = cps.astype(np.uint64) + np.uint64(1)
    out: dict[str, float] = {}
    acc = values
    for n in range(2, 11):
        acc = _extend(values, acc, n)
        if len(acc) == 0:
            share = 0.0
        else:
            ordered = np.sort(acc)
            same = ordered[1:] == ordered[:-1]  # True inside a run of equal n-grams
            if n in TOP_NGRAM_SIZES:
                starts = np.flatnonzero(np.concatenate(([True], ~same, [True])))
                share = int(np.diff(starts).max()) / len(acc)
            else:
                num_distinct = len(acc) - int(same.sum())
                num_repeated = int(same[:1].sum()) + int((same[1:] & ~same[:-1]).sum())
                share = num_repeated / num_distinct
        kind = "top" if n in TOP_NGRAM_SIZES else "duplicate"
        out[f"{kind}_{n}gram_character_fraction"] = share
    return out


def sentences_and_paragraphs(text: str, count_blank_lines: bool) -> tuple[list[str], list[str]]:
    """The reference's sentences and paragraphs (lines); without `count_blank_lines`, whitespace-only
    ones are left out (blank lines between paragraphs are layout, not repeated content)."""
    sentences = _SENTENCE.findall(text)
    lines = text.split("\n")
    if any(t in text for t in _TERMINATORS):
        lines = _LOOSE_TERMINATORS.sub("", text).split("\n")
    if not count_blank_lines:
        sentences = [s for s in sentences if not s.isspace()]
        lines = [p for p in lines if p and not p.isspace()]
    return sentences, lines


def japanese_metrics(
    text: str, count_blank_lines: bool = True, cps: np.ndarray | None = None, with_ngrams: bool = True
) -> dict:
    """All of Swallow's per-document quality values for `text` (names as in the reference); without
    `with_ngrams`, all but the n-gram fractions, and the code points they need under "_codepoints"."""
    cps = codepoints(text) if cps is None else cps
    _, hiragana, katakana, kanji, kuten, toten = letter_counts(cps)
    japanese = hiragana + katakana + kanji + kuten + toten
    sentences, paragraphs = sentences_and_paragraphs(text, count_blank_lines)
    lengths = list(map(len, sentences))
    num_ellipsis = sum(1 for s in sentences if s.rstrip().endswith(_ELLIPSES))
    para_dup, para_dup_chars = duplicate_shares(paragraphs)
    sent_dup, sent_dup_chars = duplicate_shares(sentences)
    metrics: dict[str, float | int] = {
        "num_letters": len(text),
        "num_japanese_letters": japanese,
        "hiragana_fraction": hiragana / japanese if japanese else 0.0,
        "katakana_fraction": katakana / japanese if japanese else 0.0,
        "japanese_fraction": japanese / len(text) if text else 0.0,
        "avg_sentence_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "max_sentence_length": max(lengths, default=0),
        "ellipsis_fraction": num_ellipsis / len(sentences) if sentences else 0.0,
        "duplicate_paragraph_fraction": para_dup,
        "duplicate_paragraph_fraction_in_character": para_dup_chars,
        "duplicate_sentence_fraction": sent_dup,
        "duplicate_sentence_fraction_in_character": sent_dup_chars,
    }
    if with_ngrams:
        metrics.update(ngram_fractions(cps))
    else:
        metrics["_codepoints"] = cps
    return metrics

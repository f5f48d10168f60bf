"""Decontamination: drop training documents that share long n-grams with evaluation data.

Space-separated text is compared by word n-grams (13 by default), text in scripts without spaces
(Japanese, Chinese, Korean) by character n-grams. The evaluation side becomes one sorted uint64 array
of n-gram hashes, saved once per run and memory-mapped by every worker.
"""

from __future__ import annotations

import glob
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_prep import charclass
from data_prep.config import DecontamConfig
from data_prep.ngrams import codepoints, mix64, powers, window_hashes
from kumihimo.errors import UserError

_CJK = re.compile("[\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7a3]")
_WORD_TAG = np.uint64(0x5BD1E995)  # keeps word- and char-n-gram hashes in different value sets


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def uses_char_ngrams(text: str) -> bool:
    """True when text has CJK characters, which are not separated by spaces."""
    return _CJK.search(text[:2000]) is not None


def _word_characters(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(code points of the words of the normalised text back to back, each word's length): the words
    re.findall(r"\\w+") gives, read from the class table instead of built as strings."""
    cps = codepoints(_normalize(text))
    is_word = (charclass.table()[cps] & charclass.WORD) != 0
    edges = np.diff(is_word, prepend=False, append=False).nonzero()[0]  # word starts and ends, alternating
    return cps[is_word], edges[1::2] - edges[::2]


def char_ngram_hashes(text: str, n: int) -> np.ndarray:
    """Hashes of character n-grams over the text without whitespace and punctuation."""
    return window_hashes(_word_characters(text)[0], n)


def word_ngram_hashes(text: str, n: int) -> np.ndarray:
    chars, lengths = _word_characters(text)
    if len(lengths) < n:
        return np.empty(0, dtype=np.uint64)
    return window_hashes(_run_hashes(chars, lengths), n) ^ _WORD_TAG


def word_hashes(words: list[str]) -> np.ndarray:
    """64-bit hash of each word, all words at once: a polynomial hash over code points from prefix sums
    (deterministic across processes, unlike str hash(), which is salted per process)."""
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return _run_hashes(codepoints("".join(words)), lengths)


def _run_hashes(chars: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """word_hashes of the words given as their code points back to back and their lengths."""
    values = chars.astype(np.uint64) + np.uint64(1)
    forward, inverse = powers(len(values) + 1)
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(values * forward[:len(values)], dtype=np.uint64)))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # sum of values[k] * P**(k - start) over the word: arithmetic modulo 2**64, P odd hence invertible
    return mix64((prefix[ends] - prefix[starts]) * inverse[starts] ^ lengths.astype(np.uint64))


def _eval_texts(path: str, fields: list[str]) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        if not path.endswith((".jsonl", ".json")):
            yield from (line for line in handle if line.strip())
            return
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"evaluation file {path} line {line_no} is not JSON ({exc}); "
                                "fix it or list it as a plain-text file") from exc
            values = record.values() if isinstance(record, dict) and not fields else (
                [record.get(f) for f in fields] if isinstance(record, dict) else [record])
            yield from _strings(values)


def _strings(values) -> Iterator[str]:
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            yield from _strings(value)
        elif isinstance(value, dict):
            yield from _strings(value.values())


def build_eval_index(config: DecontamConfig) -> np.ndarray:
    """Sorted unique hashes of all word and character n-grams of the evaluation data."""
    parts = [np.empty(0, dtype=np.uint64)]
    for pattern in config.eval_paths:
        paths = sorted(glob.glob(pattern))
        if not paths:
            raise UserError(f"decontam.eval_paths: {pattern!r} matches no file; fix the glob or remove it")
        for path in paths:
            for text in _eval_texts(path, config.eval_fields):
                parts.append(word_ngram_hashes(text, config.word_ngram_size))
                parts.append(char_ngram_hashes(text, config.char_ngram_size))
    return np.unique(np.concatenate(parts))


class Decontaminator:
    def __init__(self, eval_hashes: np.ndarray, config: DecontamConfig):
        self.eval_hashes = eval_hashes
        self.config = config

    def check(self, text: str) -> str | None:
        """A detail string when the document overlaps evaluation data, else None."""
        if len(self.eval_hashes) == 0:
            return None
        if uses_char_ngrams(text):
            hashes, unit, n = char_ngram_hashes(text, self.config.char_ngram_size), "char", self.config.char_ngram_size
        else:
            hashes, unit, n = word_ngram_hashes(text, self.config.word_ngram_size), "word", self.config.word_ngram_size
        if len(hashes) == 0:
            return None
        positions = np.searchsorted(self.eval_hashes, hashes)
        positions[positions == len(self.eval_hashes)] = 0
        num_shared = len(np.unique(hashes[self.eval_hashes[positions] == hashes]))
        if num_shared >= self.config.min_matches:
            return f"{num_shared} {unit} {n}-grams shared with evaluation data"
        return None


def save_eval_index(hashes: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, hashes)
    tmp.replace(path)


def load_eval_index(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")

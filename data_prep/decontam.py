"""Decontamination: drop training documents that share long n-grams with evaluation data.

Space-separated text is compared by word n-grams (13 by default), text in scripts without spaces
(Japanese, Chinese, Korean) by character n-grams. The evaluation side becomes one sorted uint64 array
of n-gram hashes, saved once per run and memory-mapped by every worker.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from kumihimo.core import records
from kumihimo.core.errors import UserError
from kumihimo.core.files import TEMP_MARK, matching_files
from kumihimo.data_prep import charclass
from kumihimo.data_prep.config import DecontamConfig
from kumihimo.data_prep.ngrams import bounded_runs, codepoints, mix64, powers, window_hashes

_CJK = re.compile("[\u3041-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7a3]")
_WORD_TAG = np.uint64(0x5BD1E995)  # keeps word- and char-n-gram hashes in different value sets
_BATCH_CHARS = 1 << 22  # characters hashed in one pass by Decontaminator.check_batch (~200 MB of arrays)


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
    prefix = np.concatenate(([np.uint64(0)], np.cumsum(values * forward[: len(values)], dtype=np.uint64)))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    # sum of values[k] * P**(k - start) over the word: arithmetic modulo 2**64, P odd hence invertible
    return mix64((prefix[ends] - prefix[starts]) * inverse[starts] ^ lengths.astype(np.uint64))


def _eval_texts(path: str, fields: list[str]) -> Iterator[str]:
    """Strings of an evaluation file (kumihimo.core.records): the `fields` of every record of a JSONL or
    Parquet file (all its strings when `fields` is empty), or every non-blank line of a .txt file."""
    accepted = ("jsonl", "parquet", "text")
    is_text = records.file_format(path, accepted) == "text"
    for _, record in records.read_records(path, accepted=accepted, columns=fields or None):
        if is_text:
            yield record["text"]
        else:
            yield from _strings(record.values() if not fields else [record.get(f) for f in fields])


def _strings(values) -> Iterator[str]:
    """Every string in `values`, in order, however deeply nested (a stack, not recursion: a record
    nested a few hundred levels deep parses, and recursing over it would hit Python's limit)."""
    stack = [iter(values)]
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
        elif isinstance(value, str):
            yield value
        elif isinstance(value, list):
            stack.append(iter(value))
        elif isinstance(value, dict):
            stack.append(iter(value.values()))


_END = object()


def build_eval_index(config: DecontamConfig) -> np.ndarray:
    """Sorted unique hashes of all word and character n-grams of the evaluation data."""
    parts = [np.empty(0, dtype=np.uint64)]
    for pattern in config.eval_paths:
        paths = matching_files(pattern, "decontam.eval_paths")
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
        return self.check_batch([text])[0]

    def check_batch(self, texts: list[str]) -> list[str | None]:
        """check() of every text. The texts of each kind (character or word n-grams) are hashed together,
        joined by a space (not a word character, so no word spans two texts); only windows that lie
        within one text are looked up."""
        results: list[str | None] = [None] * len(texts)
        if len(self.eval_hashes) == 0 or not texts:
            return results
        by_chars = [uses_char_ngrams(text) for text in texts]
        config = self.config
        for chars, unit, n in (
            (True, "char", config.char_ngram_size),
            (False, "word", config.word_ngram_size),
        ):
            of_kind = [i for i, flag in enumerate(by_chars) if flag == chars]
            for start, end in bounded_runs([len(texts[i]) for i in of_kind], _BATCH_CHARS):
                indices = of_kind[start:end]
                for k, num_shared in self._shared_counts([texts[i] for i in indices], n, chars):
                    results[indices[k]] = f"{num_shared} {unit} {n}-grams shared with evaluation data"
        return results

    def _shared_counts(self, texts: list[str], n: int, chars: bool) -> list[tuple[int, int]]:
        """(index, distinct n-grams shared) for the texts sharing at least min_matches with the evaluation
        data; their n-grams are hashed and looked up together."""
        hashes, owner = _joined_ngram_hashes(texts, n, chars)
        positions = np.searchsorted(self.eval_hashes, hashes)
        positions[positions == len(self.eval_hashes)] = 0
        hits = np.flatnonzero(self.eval_hashes[positions] == hashes)
        hit_owner = owner[hits]
        shared = []
        for k in np.unique(hit_owner).tolist():  # few: most texts share nothing
            num_shared = len(np.unique(hashes[hits[hit_owner == k]]))
            if num_shared >= self.config.min_matches:
                shared.append((k, num_shared))
        return shared


def _joined_ngram_hashes(texts: list[str], n: int, chars: bool) -> tuple[np.ndarray, np.ndarray]:
    """(hashes of the character or word n-grams of all texts, the index of the text each belongs to):
    char_ngram_hashes / word_ngram_hashes of each text, back to back."""
    normalized = [_normalize(text) for text in texts]
    cps = codepoints(" ".join(normalized))
    is_word = (charclass.table()[cps] & charclass.WORD) != 0
    # which text each code point belongs to (separators: the text before them; they are not word characters)
    text_ends = np.cumsum(np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized)) + 1)
    if chars:
        items = cps[is_word]
        counts = np.diff(
            np.concatenate(([0], np.cumsum(is_word)))[np.minimum(text_ends, len(cps))], prepend=0
        )
        item_owner = np.repeat(np.arange(len(texts)), counts)
        hashes = window_hashes(items, n)
    else:
        edges = np.diff(is_word, prepend=False, append=False).nonzero()[
            0
        ]  # word starts and ends, alternating
        starts, lengths = edges[::2], edges[1::2] - edges[::2]
        items = _run_hashes(cps[is_word], lengths)
        item_owner = np.searchsorted(text_ends, starts, side="right")
        hashes = window_hashes(items, n) ^ _WORD_TAG if len(items) >= n else np.empty(0, dtype=np.uint64)
    if len(hashes) == 0:
        return hashes, np.empty(0, dtype=np.int64)
    within = item_owner[: len(hashes)] == item_owner[n - 1 :]
    return hashes[within], item_owner[: len(hashes)][within]


def save_eval_index(hashes: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}.npy")
    np.save(tmp, hashes)
    tmp.replace(path)


def load_eval_index(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")

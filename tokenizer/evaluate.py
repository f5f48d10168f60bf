"""Compare tokenizers side by side: characters per token, byte-fallback and unknown rates per
language, and what the vocabulary is made of.

Characters per token is the figure LLM-jp reports for llm-jp-tokenizer v3 (ja 2.02, en 3.95,
code 2.75): more characters per token means shorter sequences for the same text.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kumihimo.core import records
from kumihimo.core.configtree import write_text_atomic
from kumihimo.core.errors import UserError
from kumihimo.core.jsonl_rows import open_text
from kumihimo.tokenizer.spm import SentencePieceTokenizer

PIECE_CLASSES = ("japanese", "latin", "digit", "code", "whitespace", "other", "byte", "special")
JAPANESE_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」々〆)
    (0x3040, 0x30FF),  # hiragana, katakana
    (0x31F0, 0x31FF),  # katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF00, 0xFFEF),  # full-width and half-width forms
    (0x20000, 0x3FFFF),  # CJK extensions B.. (𠮷, 𩸽)
)
CODE_PUNCTUATION = set("(){}[]<>=;:_#/\\.,'\"`!&|%*+-^~$@?")
DOCUMENTS_PER_BATCH = 512
LINES_PER_PLAIN_DOCUMENT = 200


def is_japanese(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in JAPANESE_RANGES)


def classify_piece(piece: str) -> str:
    """Class of a normal or user-defined piece by its characters ("▁" counts as a space)."""
    text = piece.replace("▁", " ")
    if not text or text.isspace():
        return "whitespace"
    if any(is_japanese(c) for c in text):
        return "japanese"
    body = text.lstrip(" ")
    if body.isascii() and body.isalpha():
        return "latin"
    if body.isascii() and body.isdigit():
        return "digit"
    if body.isascii() and any(c in CODE_PUNCTUATION for c in body):
        return "code"
    if body.isascii() and all(c.isspace() or unicodedata.category(c).startswith("C") for c in body):
        return "whitespace"
    return "other"


def vocab_composition(tokenizer: SentencePieceTokenizer) -> dict[str, int]:
    """Number of pieces in each of PIECE_CLASSES."""
    sp = tokenizer.sp
    counts = Counter({name: 0 for name in PIECE_CLASSES})
    for token_id in range(tokenizer.vocab_size):
        if sp.IsByte(token_id):
            counts["byte"] += 1
        elif sp.IsControl(token_id) or sp.IsUnknown(token_id) or sp.IsUnused(token_id):
            counts["special"] += 1
        else:
            counts[classify_piece(sp.IdToPiece(token_id))] += 1
    return dict(counts)


@dataclass
class TextStats:
    """Token statistics of one tokenizer on the texts of one language."""

    num_documents: int = 0
    num_chars: int = 0
    num_tokens: int = 0
    num_byte_tokens: int = 0
    num_unk_tokens: int = 0

    @property
    def chars_per_token(self) -> float:
        return self.num_chars / self.num_tokens if self.num_tokens else 0.0

    @property
    def byte_fallback_rate(self) -> float:
        return self.num_byte_tokens / self.num_tokens if self.num_tokens else 0.0

    @property
    def unk_rate(self) -> float:
        return self.num_unk_tokens / self.num_tokens if self.num_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "chars_per_token": round(self.chars_per_token, 4),
            "byte_fallback_rate": round(self.byte_fallback_rate, 6),
            "unk_rate": round(self.unk_rate, 6),
        }


def parse_text_spec(spec: str) -> tuple[Path, str]:
    """`file[:lang]` -> (path, lang); without a lang the file's stem names the column."""
    path_part, sep, lang = spec.rpartition(":")
    if sep and path_part and lang and "/" not in lang and not Path(spec).exists():
        path = Path(path_part)
    else:
        path, lang = Path(spec), ""
    if not path.is_file():
        raise UserError(f"--text {spec!r}: {str(path)!r} does not exist; pass FILE or FILE:LANG")
    return path, lang or path.name.split(".")[0]


def read_documents(path: Path, text_field: str = "text", max_documents: int | None = None) -> Iterator[str]:
    """Documents of a record file (JSONL, .jsonl.gz/.zst, Parquet or WARC: its `text_field`) or of a
    plain text file (.txt, .txt.gz, .txt.zst: groups of lines), read by kumihimo.core.records."""
    kind = records.file_format(str(path), (*records.RECORD_FORMATS, "text"))
    documents = _line_groups(path) if kind == "text" else _record_texts(path, text_field)
    for count, text in enumerate(documents):
        if max_documents is not None and count >= max_documents:
            return
        yield text


def _record_texts(path: Path, text_field: str) -> Iterator[str]:
    for position, record in records.read_records(str(path), columns=[text_field]):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise UserError(f"{path}:{position} has no string field {text_field!r}; pass --text-field")
        yield text


def _line_groups(path: Path) -> Iterator[str]:
    lines: list[str] = []
    try:
        with open_text(str(path)) as handle:
            for line in handle:
                lines.append(line)
                if len(lines) == LINES_PER_PLAIN_DOCUMENT:
                    yield "".join(lines)
                    lines = []
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({exc}); pass UTF-8 text") from exc
    if lines:
        yield "".join(lines)


def measure(tokenizer: SentencePieceTokenizer, documents: Iterator[str], num_threads: int = 1) -> TextStats:
    stats = TextStats()
    sp = tokenizer.sp
    byte_ids = {i for i in range(tokenizer.vocab_size) if sp.IsByte(i)}
    batch: list[str] = []

    def flush() -> None:
        for text, ids in zip(batch, tokenizer.encode_batch(batch, num_threads)):
            stats.num_documents += 1
            stats.num_chars += len(text)
            stats.num_tokens += len(ids)
            stats.num_byte_tokens += sum(1 for i in ids if i in byte_ids)
            stats.num_unk_tokens += sum(1 for i in ids if i == tokenizer.unk_id)
        batch.clear()

    for text in documents:
        batch.append(text)
        if len(batch) == DOCUMENTS_PER_BATCH:
            flush()
    flush()
    return stats


def evaluate(
    tokenizer_paths: list[str],
    text_specs: list[str],
    text_field: str = "text",
    max_documents: int | None = None,
    num_threads: int = 1,
) -> dict[str, Any]:
    """Statistics of every tokenizer on every text, grouped by language."""
    if not tokenizer_paths:
        raise UserError("no tokenizer given; pass --tokenizer MODEL (repeat it to compare several)")
    texts = [parse_text_spec(spec) for spec in text_specs]
    results = []
    for path in tokenizer_paths:
        tokenizer = SentencePieceTokenizer(path)
        per_lang: dict[str, TextStats] = {}
        for text_path, lang in texts:
            stats = measure(tokenizer, read_documents(text_path, text_field, max_documents), num_threads)
            total = per_lang.setdefault(lang, TextStats())
            for key, value in asdict(stats).items():
                setattr(total, key, getattr(total, key) + value)
        results.append(
            {
                "path": str(tokenizer.path),
                "sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size,
                "composition": vocab_composition(tokenizer),
                "texts": {lang: stats.as_dict() for lang, stats in per_lang.items()},
            }
        )
    return {"tokenizers": results, "languages": list(dict.fromkeys(lang for _, lang in texts))}


def _column_names(report: dict[str, Any]) -> list[str]:
    paths = [Path(t["path"]) for t in report["tokenizers"]]
    names = [p.parent.name if p.name == "tokenizer.model" else p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def format_table(report: dict[str, Any]) -> str:
    """The report as an aligned text table: one row per figure, one column per tokenizer."""
    tokenizers = report["tokenizers"]
    rows: list[tuple[str, list[str]]] = [("vocab size", [f"{t['vocab_size']:,}" for t in tokenizers])]
    for lang in report["languages"]:
        per = [t["texts"][lang] for t in tokenizers]
        rows.append((f"{lang}: chars/token", [f"{s['chars_per_token']:.3f}" for s in per]))
        rows.append((f"{lang}: tokens", [f"{s['num_tokens']:,}" for s in per]))
        rows.append((f"{lang}: byte-fallback", [f"{s['byte_fallback_rate']:.3%}" for s in per]))
        rows.append((f"{lang}: unknown", [f"{s['unk_rate']:.3%}" for s in per]))
    for name in PIECE_CLASSES:
        rows.append(
            (
                f"vocab: {name}",
                [
                    f"{t['composition'][name]:,} ({t['composition'][name] / t['vocab_size']:.1%})"
                    for t in tokenizers
                ],
            )
        )
    header = ("", _column_names(report))
    label_width = max(len(label) for label, _ in (header, *rows))
    widths = [max(len(cells[i]) for _, cells in (header, *rows)) for i in range(len(tokenizers))]
    lines = []
    for label, cells in (header, *rows):
        lines.append("  ".join([label.ljust(label_width)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    write_text_atomic(Path(path), json.dumps(report, ensure_ascii=False, indent=2) + "\n")

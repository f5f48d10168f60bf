"""One reader for every record file the stages take in: JSONL (plain, .gz, .zst), Parquet, WARC, plain text.

data_prep, tokenizer training and evaluation, and the decontamination index all read through here, so
a format works everywhere or nowhere and an unsupported file gets the same one-line error everywhere.

Two ways to read:
- `iter_records(path)` is lenient: every record comes back as a `Record` (its position, the record as a
  dict, a raw excerpt) or a `BadRecord` (position, reason, detail, excerpt), and reading goes on. WARC
  also gives `Skipped` for pages its own checks leave out (not Japanese, not HTML, no main text).
  data_prep turns these into documents and quarantine events.
- `read_records(path)` is strict, for inputs that must be clean (tokenizer samples, evaluation sets):
  the first bad record raises a UserError naming the file, the position and the reason.

Positions are 1-based line numbers (JSONL, text), 1-based row numbers in the file (Parquet) and byte
offsets of the record in the file (WARC; compressed offsets for .warc.gz, where a reader can seek).
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, NamedTuple

from kumihimo.core.errors import UserError

EXCERPT_CHARS = 300
# Suffix -> format. Compressed JSONL and text are decompressed on the fly; WARC decompresses itself.
FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".jsonl.zstd": "jsonl",
    ".json": "jsonl",  # one JSON object per line, as many evaluation sets ship
    ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".warc.gz": "warc",
    ".warc": "warc",
    ".txt": "text",
    ".txt.gz": "text",
    ".txt.zst": "text",
}
RECORD_FORMATS = ("jsonl", "parquet", "warc")
# BadRecord reasons as read_records words them after "<file>:<position>".
PROBLEMS = {
    "corrupt_file": "is unreadable",
    "invalid_utf8": "is not UTF-8",
    "malformed_json": "is not valid JSON",
    "not_an_object": "is not a JSON object",
    "truncated_record": "is a truncated WARC record",
    "undecodable_page": "is a page in no Japanese encoding",
    "extraction_failed": "is a page the extractor failed on",
}


class Record(NamedTuple):
    """One readable record: `fields` is the JSON object, the Parquet row or the extracted WARC page."""

    position: int
    fields: dict[str, Any]
    excerpt: str


@dataclass(frozen=True)
class BadRecord:
    """A record (or the rest of a file) that could not be read; `reason` is a short snake_case code."""

    position: int
    reason: str
    detail: str
    excerpt: str


@dataclass(frozen=True)
class Skipped:
    """A readable WARC record that is not a document: not Japanese, not HTML, no main text."""

    position: int
    record_id: str
    stage: str
    reason: str
    detail: str
    excerpt: str


def file_format(path: str, accepted: tuple[str, ...] = RECORD_FORMATS) -> str:
    """The format of `path` from its suffix, or a UserError naming the suffixes that `accepted` allows."""
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix) and FORMATS[suffix] in accepted:
            return FORMATS[suffix]
    allowed = ", ".join(s for s, f in FORMATS.items() if f in accepted)
    raise UserError(f"{path}: unsupported file type; use one of {allowed} (rename or convert the file)")


def open_binary(path: str) -> IO[bytes]:
    """`path` opened for reading bytes, decompressing .gz and .zst/.zstd."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith((".zst", ".zstd")):
        try:
            import zstandard
        except ImportError as exc:
            raise UserError(
                f"{path} is zstd-compressed but the zstandard module is not installed; "
                "run `pip install zstandard` or decompress the file"
            ) from exc
        raw = open(path, "rb")  # noqa: SIM115 - closed through the wrapper
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")  # noqa: SIM115


def open_text(path: str) -> IO[str]:
    """`path` (plain, .gz or .zst) opened for reading UTF-8 text, with universal newlines as open() has."""
    return io.TextIOWrapper(open_binary(path), encoding="utf-8")


def iter_lines(
    path: str, start_byte: int = 0, end_byte: int | None = None, first_line: int = 1
) -> Iterator[tuple[int, bytes | None, str]]:
    """(line number, bytes, error) of the lines starting in [start_byte, end_byte); bytes is None when
    the file itself broke (truncated gzip...), and then it is the last item."""
    line_no = first_line - 1
    try:
        with open_binary(path) as handle:
            if start_byte:
                handle.seek(start_byte)
            position = start_byte
            for raw in handle:
                if end_byte is not None and position >= end_byte:
                    return
                position += len(raw)
                line_no += 1
                yield line_no, raw, ""
    except (EOFError, OSError, zlib.error) as exc:
        yield line_no + 1, None, f"{type(exc).__name__}: {exc}"


def iter_jsonl(
    path: str, start_byte: int = 0, end_byte: int | None = None, first_line: int = 1
) -> Iterator[Record | BadRecord]:
    """JSON objects of a JSONL file (or a byte range of one); blank lines give nothing."""
    for line_no, raw, error in iter_lines(path, start_byte, end_byte, first_line):
        if raw is None:
            yield BadRecord(line_no, "corrupt_file", error, "")
            continue
        if not raw.strip():
            continue  # blank lines carry no record; they are not counted as input
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield BadRecord(line_no, "invalid_utf8", str(exc), raw[:EXCERPT_CHARS].decode("utf-8", "replace"))
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nested too deep to read
            detail = str(exc) if isinstance(exc, json.JSONDecodeError) else "nested too deep to read"
            yield BadRecord(line_no, "malformed_json", detail, line[:EXCERPT_CHARS])
            continue
        if not isinstance(record, dict):
            detail = f"a JSON {type(record).__name__}, not an object"
            yield BadRecord(line_no, "not_an_object", detail, line[:EXCERPT_CHARS])
            continue
        yield Record(line_no, record, line[:EXCERPT_CHARS])


def iter_records(
    path: str,
    *,
    columns: list[str] | None = None,
    accepted: tuple[str, ...] = RECORD_FORMATS,
    warc_extractor: str = "resiliparse",
    warc_japanese_precheck: bool = True,
) -> Iterator[Record | BadRecord | Skipped]:
    """Every record of a whole file, leniently. `columns` limits what Parquet reads (None: all);
    text files give one record per non-blank line as {"text": line}."""
    kind = file_format(path, accepted)
    if kind == "jsonl":
        yield from iter_jsonl(path)
    elif kind == "parquet":
        from kumihimo.core.parquet_rows import iter_parquet  # pyarrow is loaded only when needed

        yield from iter_parquet(path, columns=columns)
    elif kind == "warc":
        from kumihimo.core.warc import iter_warc  # fastwarc and the extractor are loaded only when needed

        yield from iter_warc(path, extractor=warc_extractor, japanese_precheck=warc_japanese_precheck)
    else:
        for line_no, raw, error in iter_lines(path):
            if raw is None:
                yield BadRecord(line_no, "corrupt_file", error, "")
            elif raw.strip():
                yield Record(line_no, {"text": raw.decode("utf-8", "replace")}, "")


def read_records(path: str, **options: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, record) of every record, strictly: a bad record raises a UserError. Options are
    those of iter_records; WARC pages that its checks leave out are passed over."""
    for item in iter_records(path, **options):
        if isinstance(item, BadRecord):
            problem = PROBLEMS.get(item.reason, item.reason.replace("_", " "))
            raise UserError(f"{path}:{item.position} {problem} ({item.detail}); fix or remove that record")
        if isinstance(item, Record):
            yield item.position, item.fields

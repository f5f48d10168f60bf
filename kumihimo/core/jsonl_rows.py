"""Line-oriented record files, plain or compressed (.gz, .zst/.zstd): opening them, reading their lines
(or a byte range of them), and JSONL lines as records of kumihimo.core.record_types. Plain-text files
are read here too, one record per non-blank line."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from typing import IO

from kumihimo.core.errors import UserError
from kumihimo.core.record_types import EXCERPT_CHARS, BadRecord, Record


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


def iter_text(path: str) -> Iterator[Record | BadRecord]:
    """Every non-blank line of a plain-text file as {"text": line} (invalid UTF-8 replaced)."""
    for line_no, raw, error in iter_lines(path):
        if raw is None:
            yield BadRecord(line_no, "corrupt_file", error, "")
        elif raw.strip():
            yield Record(line_no, {"text": raw.decode("utf-8", "replace")}, "")

"""Reading input JSONL (plain, gzip, zstd) and Parquet into shards, and writing JSONL atomically.

A shard is one compressed file, a byte range of a large plain file cut at line starts, or a run of
row groups of a Parquet file (data_prep/parquet_io.py); shards are the unit of parallel work and of
resume. Reading never stops on bad input: each bad line (or Parquet row) comes back as a quarantine
event carrying the file, the line (row) number and the reason.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kumihimo.core.errors import UserError
from kumihimo.core.files import temp_file_beside
from kumihimo.data_prep.config import DataPrepConfig, InputConfig

COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
PARQUET_SUFFIX = ".parquet"
READ_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of one input file; `index` orders all shards of a run (source, file, offset)."""

    index: int
    source: str
    path: str
    start_byte: int
    end_byte: int | None  # None: to the end of the file
    first_line: int  # 1-based number of the shard's first line (Parquet: of its first row in the file)
    row_groups: tuple[int, int] | None = None  # Parquet: row groups [first, end); None for JSONL

    @property
    def shard_id(self) -> str:
        return f"{self.index:06d}"


@dataclass
class Document:
    source: str
    path: str
    line: int
    doc_id: str
    text: str
    url: str | None
    meta: dict[str, Any]


@dataclass
class BadLine:
    source: str
    path: str
    line: int
    reason: str
    detail: str
    raw: str


def _open_binary(path: str) -> IO[bytes]:
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


def _line_starts(path: str, size: int, shard_bytes: int) -> list[tuple[int, int]]:
    """(byte offset, line number) of shard starts, cut at the first line start after each multiple."""
    cuts = [(0, 1)]
    line = 1
    counted_to = 0
    with open(path, "rb") as handle:
        for target in range(shard_bytes, size, shard_bytes):
            if target <= cuts[-1][0]:
                continue
            handle.seek(target)
            handle.readline()
            offset = handle.tell()
            if offset >= size:
                break
            # count newlines between the previous counting point and this cut
            handle.seek(counted_to)
            remaining = offset - counted_to
            while remaining > 0:
                block = handle.read(min(READ_BLOCK_BYTES, remaining))
                line += block.count(b"\n")
                remaining -= len(block)
            counted_to = offset
            cuts.append((offset, line))
    return cuts


def expand_source_paths(patterns: list[str], source: str) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        matched = sorted(
            p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
        )
        if not matched:
            raise UserError(
                f"input.sources[{source}].paths: {pattern!r} matches no file; fix the glob or remove it"
            )
        paths.extend(p for p in matched if p not in paths)
    return paths


def plan_shards(config: DataPrepConfig) -> list[Shard]:
    """All shards of the run, in (source order, file, offset) order: that order decides dedup winners."""
    shards: list[Shard] = []
    for source in config.input.sources:
        for path in expand_source_paths(source.paths, source.name):
            if path.endswith(PARQUET_SUFFIX):
                from kumihimo.data_prep.parquet_io import row_group_runs  # pyarrow is loaded only when needed

                for first, end, first_row in row_group_runs(path, config.input, config.input.shard_bytes):
                    shards.append(Shard(len(shards), source.name, path, 0, None, first_row, (first, end)))
                continue
            if path.endswith((".zst", ".zstd")):
                _open_binary(path).close()  # fail now, not in a worker, if zstandard is missing
            size = os.path.getsize(path)
            if path.endswith(COMPRESSED_SUFFIXES) or size <= config.input.shard_bytes:
                shards.append(Shard(len(shards), source.name, path, 0, None, 1))
                continue
            cuts = _line_starts(path, size, config.input.shard_bytes)
            for i, (offset, line) in enumerate(cuts):
                end = cuts[i + 1][0] if i + 1 < len(cuts) else None
                shards.append(Shard(len(shards), source.name, path, offset, end, line))
    return shards


def _iter_raw_lines(shard: Shard) -> Iterator[tuple[int, bytes | None, str]]:
    """(line number, bytes, error). bytes is None when the file itself broke (truncated gzip...)."""
    line_no = shard.first_line - 1
    try:
        with _open_binary(shard.path) as handle:
            if shard.start_byte:
                handle.seek(shard.start_byte)
            position = shard.start_byte
            for raw in handle:
                if shard.end_byte is not None and position >= shard.end_byte:
                    return
                position += len(raw)
                line_no += 1
                yield line_no, raw, ""
    except (EOFError, OSError, zlib.error) as exc:
        yield line_no + 1, None, f"{type(exc).__name__}: {exc}"


def read_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine]:
    """Parse a shard's lines; every line gives exactly one Document or BadLine (blank lines: none)."""
    if shard.row_groups is not None:
        from kumihimo.data_prep.parquet_io import read_parquet_shard

        yield from read_parquet_shard(shard, fields)
        return
    for line_no, raw, error in _iter_raw_lines(shard):
        if raw is None:
            yield BadLine(shard.source, shard.path, line_no, "corrupt_file", error, "")
            continue
        if not raw.strip():
            continue  # blank lines carry no document; they are not counted as input
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield BadLine(
                shard.source,
                shard.path,
                line_no,
                "invalid_utf8",
                str(exc),
                raw[:300].decode("utf-8", "replace"),
            )
            continue
        yield _parse(line, line_no, shard, fields)


def _parse(line: str, line_no: int, shard: Shard, fields: InputConfig) -> Document | BadLine:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine(shard.source, shard.path, line_no, "malformed_json", str(exc), line[:300])
    if not isinstance(record, dict):
        return BadLine(
            shard.source,
            shard.path,
            line_no,
            "not_an_object",
            f"a JSON {type(record).__name__}, not an object",
            line[:300],
        )
    return document_from_record(record, line_no, shard, fields, line[:300])


def document_from_record(
    record: dict[str, Any], line_no: int, shard: Shard, fields: InputConfig, raw: str
) -> Document | BadLine:
    """One input record (a JSON object, a Parquet row) -> a Document, or a BadLine saying what is wrong.
    A missing key and a missing Parquet column are the same case."""

    def bad(reason: str, detail: str) -> BadLine:
        return BadLine(shard.source, shard.path, line_no, reason, detail, raw)

    if fields.text_field not in record:
        return bad("missing_text_field", f"no {fields.text_field!r} field")
    text = record[fields.text_field]
    if not isinstance(text, str):
        kind = "null" if text is None else f"a {type(text).__name__}"
        return bad("text_not_string", f"{fields.text_field!r} is {kind}")
    if not text.strip():
        return bad("empty_text", f"{fields.text_field!r} is empty")
    doc_id = record.get(fields.id_field)
    doc_id = str(doc_id) if doc_id is not None else f"{shard.source}:{os.path.basename(shard.path)}:{line_no}"
    url = record.get(fields.url_field) if fields.url_field else None
    meta = {k: record[k] for k in fields.meta_fields if k in record}
    # A JSON escape of half a surrogate pair ("\ud800") parses but can never be written as UTF-8.
    for name, value in ((fields.text_field, text), (fields.id_field, doc_id), (fields.url_field, url)):
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return bad("invalid_unicode", f"{name!r} holds an unpaired surrogate at {exc.start}")
    return Document(
        shard.source, shard.path, line_no, doc_id, text, url if isinstance(url, str) else None, meta
    )


class AtomicJsonlWriter:
    """Write JSON lines to a temp file next to `path`; rename on clean close, delete on error."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fd, self.tmp = temp_file_beside(self.path)
        self.handle = os.fdopen(fd, "w", encoding="utf-8")
        self.num_records = 0

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.num_records += 1

    def write_line(self, line: str) -> None:
        self.handle.write(line if line.endswith("\n") else line + "\n")
        self.num_records += 1

    def __enter__(self) -> AtomicJsonlWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.handle.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            Path(self.tmp).unlink(missing_ok=True)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Read a JSONL file this pipeline wrote (trusted: no quarantine)."""
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)

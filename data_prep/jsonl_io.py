"""Reading input JSONL (plain, gzip, zstd), Parquet and WARC into shards, and writing JSONL atomically.

A shard is one compressed file, a byte range of a large plain file cut at line starts, a run of
row groups of a Parquet file (data_prep/parquet_io.py) or one WARC file; shards are the unit of
parallel work and of resume. The files themselves are read by kumihimo.core.records, the one reader
the tokenizer and decontamination use too. Reading never stops on bad input: each bad line (Parquet
row, WARC record) comes back as a quarantine event carrying the file, the line (row number, byte
offset) and the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kumihimo.core import records
from kumihimo.core.errors import UserError
from kumihimo.core.files import matching_files, temp_file_beside
from kumihimo.data_prep.config import DataPrepConfig, InputConfig

COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
READ_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Shard:
    """A contiguous piece of one input file; `index` orders all shards of a run (source, file, offset)."""

    index: int
    source: str
    path: str
    start_byte: int
    end_byte: int | None  # None: to the end of the file
    first_line: (
        int  # 1-based number of the shard's first line (Parquet: of its first row in the file; WARC: 1)
    )
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


@dataclass
class Dropped:
    """A readable input record the reader itself leaves out (WARC: not Japanese, not HTML, no main text);
    it counts as input and is recorded as a drop of `stage`, like the later stages' drops."""

    source: str
    path: str
    line: int
    doc_id: str
    stage: str
    reason: str
    detail: str
    excerpt: str


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
        matched = matching_files(pattern, f"input.sources[{source}].paths")
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
            kind = records.file_format(path)  # an unsupported suffix fails here, before any worker starts
            if kind == "warc":
                shards.append(Shard(len(shards), source.name, path, 0, None, 1))
                continue
            if kind == "parquet":
                from kumihimo.data_prep.parquet_io import row_group_runs  # pyarrow is loaded only when needed

                for first, end, first_row in row_group_runs(path, config.input, config.input.shard_bytes):
                    shards.append(Shard(len(shards), source.name, path, 0, None, first_row, (first, end)))
                continue
            if path.endswith((".zst", ".zstd")):
                records.open_binary(path).close()  # fail now, not in a worker, if zstandard is missing
            size = os.path.getsize(path)
            if path.endswith(COMPRESSED_SUFFIXES) or size <= config.input.shard_bytes:
                shards.append(Shard(len(shards), source.name, path, 0, None, 1))
                continue
            cuts = _line_starts(path, size, config.input.shard_bytes)
            for i, (offset, line) in enumerate(cuts):
                end = cuts[i + 1][0] if i + 1 < len(cuts) else None
                shards.append(Shard(len(shards), source.name, path, offset, end, line))
    return shards


def read_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine | Dropped]:
    """Parse a shard's records; every line (row, WARC response record) gives exactly one Document,
    BadLine or Dropped (blank lines and non-response WARC records: none)."""
    if shard.row_groups is not None:
        from kumihimo.data_prep.parquet_io import read_parquet_shard

        yield from read_parquet_shard(shard, fields)
        return
    if records.file_format(shard.path) == "warc":
        yield from _read_warc_shard(shard, fields)
        return
    for item in records.iter_jsonl(shard.path, shard.start_byte, shard.end_byte, shard.first_line):
        if isinstance(item, records.BadRecord):
            yield BadLine(shard.source, shard.path, item.position, item.reason, item.detail, item.excerpt)
        else:
            yield document_from_record(item.fields, item.position, shard, fields, item.excerpt)


def _read_warc_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine | Dropped]:
    """A WARC file's pages; `line` is the record's byte offset in the file (where `dd skip=` finds it)."""
    from kumihimo.core.warc import iter_warc  # fastwarc and the extractor load only for WARC input

    options = fields.warc
    for item in iter_warc(
        shard.path, extractor=options.extractor, japanese_precheck=options.japanese_precheck
    ):
        if isinstance(item, records.BadRecord):
            yield BadLine(shard.source, shard.path, item.position, item.reason, item.detail, item.excerpt)
        elif isinstance(item, records.Skipped):
            yield Dropped(
                shard.source,
                shard.path,
                item.position,
                item.record_id,
                item.stage,
                item.reason,
                item.detail,
                item.excerpt,
            )
        else:
            page = item.fields
            doc_id = page["id"] or f"{shard.source}:{os.path.basename(shard.path)}:{item.position}"
            meta = {"title": page["title"], "date": page["date"]}
            yield Document(
                shard.source, shard.path, item.position, doc_id, page["text"], page["url"] or None, meta
            )


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

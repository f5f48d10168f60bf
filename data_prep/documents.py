"""The document types of data_prep and the one rule that turns an input record into one.

A `Shard` is a contiguous piece of one input file, the unit of parallel work and of resume. Reading a
shard gives, per input record, exactly one `Document`, `BadLine` (a quarantine event: the file, the line,
row number or byte offset, and the reason) or `Dropped` (a record the reader itself leaves out). The
format readers (jsonl_io, parquet_io, warc_io) build them from kumihimo.core's record types; the shard
stage and the reports consume them. `document_from_record` checks a JSON object or Parquet row the same
way for every format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kumihimo.data_prep.config import InputConfig


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
    """One readable input record with a non-empty text: what the curation stages work on."""

    source: str
    path: str
    line: int
    doc_id: str
    text: str
    url: str | None
    meta: dict[str, Any]


@dataclass
class BadLine:
    """An input record that cannot be a document (unreadable, no text...): a quarantine event."""

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

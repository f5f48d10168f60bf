"""The record types every file reader gives: `Record` (readable), `BadRecord` (not readable) and `Skipped`
(a readable WARC record that is not a document).

The format readers (kumihimo.core.jsonl_rows, parquet_rows, warc) build them and kumihimo.core.records
hands them on; data_prep turns them into documents and quarantine events. Positions are 1-based line
numbers (JSONL, text), 1-based row numbers in the file (Parquet) and byte offsets of the record in the
file (WARC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

EXCERPT_CHARS = 300


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

"""JSONL in data_prep: cutting a large plain input file into shards at line starts, reading a JSONL shard
into documents (data_prep/documents.py), and writing JSONL atomically (the curated, dropped and
quarantine files, each shard's candidates).

The lines themselves are read by kumihimo.core.jsonl_rows, the reader the tokenizer and decontamination
use too. Reading never stops on bad input: each bad line comes back as a BadLine carrying the file, the
line and the reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kumihimo.core.files import temp_file_beside
from kumihimo.core.jsonl_rows import iter_jsonl as iter_jsonl_records
from kumihimo.core.record_types import BadRecord
from kumihimo.data_prep.config import InputConfig
from kumihimo.data_prep.documents import BadLine, Document, Shard, document_from_record

READ_BLOCK_BYTES = 1 << 20


def line_starts(path: str, size: int, shard_bytes: int) -> list[tuple[int, int]]:
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


def read_jsonl_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine]:
    """Every line of a JSONL shard (a whole file or a byte range of one) gives one Document or BadLine;
    blank lines give nothing."""
    for item in iter_jsonl_records(shard.path, shard.start_byte, shard.end_byte, shard.first_line):
        if isinstance(item, BadRecord):
            yield BadLine(shard.source, shard.path, item.position, item.reason, item.detail, item.excerpt)
        else:
            yield document_from_record(item.fields, item.position, shard, fields, item.excerpt)


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

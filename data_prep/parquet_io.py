"""Reading input Parquet files: shards are runs of row groups, rows become documents or quarantine events.

A Parquet file is cut into shards of whole row groups (about `input.shard_bytes` of the columns read,
uncompressed), so a big file is spread over workers as a big plain JSONL file is spread by byte range.
A shard reads one row group at a time, in batches, and only the configured text, id, url and meta
columns (kumihimo.core.parquet_rows), so memory stays bounded by one batch whatever the file size.
Rows are checked by the same rules as JSONL lines (`documents.document_from_record`); a row's number (1-based, in the file) is
reported in the `line` field so that quarantine, dropped and curated records look the same for both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from kumihimo.core.parquet_rows import READ_ERRORS, iter_parquet
from kumihimo.core.record_types import BadRecord
from kumihimo.data_prep.config import InputConfig
from kumihimo.data_prep.documents import BadLine, Document, Shard, document_from_record


def wanted_columns(fields: InputConfig) -> list[str]:
    """Columns a shard reads: text, id, url and meta fields, each once, in that order."""
    names = [fields.text_field, fields.id_field, fields.url_field, *fields.meta_fields]
    return list(dict.fromkeys(name for name in names if name))


def row_group_runs(path: str, fields: InputConfig, shard_bytes: int) -> list[tuple[int, int, int]]:
    """(first row group, end row group, first row number) of each shard of one file.

    Consecutive row groups are joined until the columns read hold about `shard_bytes` uncompressed;
    a row group is never split (it is Parquet's smallest independently readable unit). A file whose
    footer cannot be read gives one shard whose reading quarantines the whole file (see read_parquet_shard).
    """
    try:
        metadata = pq.ParquetFile(path).metadata
    except READ_ERRORS:
        return [(0, 0, 1)]
    wanted = set(wanted_columns(fields))
    runs: list[tuple[int, int, int]] = []
    first_group, first_row, row, run_bytes = 0, 1, 1, 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        run_bytes += sum(
            group.column(c).total_uncompressed_size
            for c in range(group.num_columns)
            if group.column(c).path_in_schema.split(".")[0] in wanted
        )
        row += group.num_rows
        if run_bytes >= shard_bytes:
            runs.append((first_group, index + 1, first_row))
            first_group, first_row, run_bytes = index + 1, row, 0
    if first_group < metadata.num_row_groups or not runs:
        runs.append((first_group, metadata.num_row_groups, first_row))
    return runs


def _json_safe(value: Any) -> Any:
    """Parquet values (timestamps, decimals, bytes) as JSON values, for `meta` of kept documents."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _row_to_item(
    record: dict[str, Any], row: int, raw: str, shard: Shard, fields: InputConfig
) -> Document | BadLine:
    text = record.get(fields.text_field)
    if isinstance(text, bytes):  # a string column with invalid UTF-8, or a plain binary column
        try:
            record[fields.text_field] = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return BadLine(shard.source, shard.path, row, "invalid_utf8", str(exc), raw)
    for name in fields.meta_fields:
        if name in record:
            record[name] = _json_safe(record[name])
    return document_from_record(record, row, shard, fields, raw)


def read_parquet_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine]:
    """Every row of the shard's row groups gives exactly one Document or BadLine.

    A file that is not readable Parquet is quarantined as one `corrupt_file` event and the run goes on,
    as a truncated or non-gzip .gz file is: one bad file among thousands must not stop a long run, and
    report.md lists it. A row group that fails to decode is one such event too; later ones are read.
    """
    assert shard.row_groups is not None, "not a Parquet shard"
    rows = iter_parquet(shard.path, shard.row_groups, wanted_columns(fields), shard.first_line)
    for item in rows:
        if isinstance(item, BadRecord):
            yield BadLine(shard.source, shard.path, item.position, item.reason, item.detail, item.excerpt)
        else:
            yield _row_to_item(item.fields, item.position, item.excerpt, shard, fields)

"""Reading input Parquet files: shards are runs of row groups, rows become documents or quarantine events.

A Parquet file is cut into shards of whole row groups (about `input.shard_bytes` of the columns read,
uncompressed), so a big file is spread over workers as a big plain JSONL file is spread by byte range.
A shard reads one row group at a time, in batches, and only the configured text, id, url and meta
columns, so memory stays bounded by one batch whatever the file size. Rows are checked by the same
rules as JSONL lines (`jsonl_io.document_from_record`); a row's number (1-based, in the file) is
reported in the `line` field so that quarantine, dropped and curated records look the same for both.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kumihimo.data_prep.config import InputConfig
from kumihimo.data_prep.jsonl_io import BadLine, Document, Shard, document_from_record

BATCH_ROWS = 1024
RAW_EXCERPT_CHARS = 300
# What pyarrow raises for a file or a row group it cannot decode (bad footer, truncated page...).
_READ_ERRORS = (OSError, pa.ArrowException, EOFError)


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
    except _READ_ERRORS:
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


def _column_values(column: pa.Array) -> list[Any]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        # pyarrow does not check UTF-8 when it reads a string column; give the bytes to the row check
        return column.cast(pa.binary()).to_pylist()


def _json_safe(value: Any) -> Any:
    """Parquet values (timestamps, decimals, bytes) as JSON values, for `meta` of kept documents."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def _row_to_item(record: dict[str, Any], row: int, shard: Shard, fields: InputConfig) -> Document | BadLine:
    raw = json.dumps(record, ensure_ascii=False, default=str)[:RAW_EXCERPT_CHARS]
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


def _iter_row_group(parquet: pq.ParquetFile, group: int, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The rows of one row group as {column: value}; nulls stay as None, absent columns are left out."""
    for batch in parquet.iter_batches(
        batch_size=BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False
    ):
        values = [_column_values(batch.column(i)) for i in range(batch.num_columns)]
        names = batch.schema.names
        for row in range(batch.num_rows):
            yield {name: column[row] for name, column in zip(names, values)}


def read_parquet_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine]:
    """Every row of the shard's row groups gives exactly one Document or BadLine.

    A file that is not readable Parquet is quarantined as one `corrupt_file` event and the run goes on,
    as a truncated or non-gzip .gz file is: one bad file among thousands must not stop a long run, and
    report.md lists it. A row group that fails to decode is one such event too; later ones are read.
    """
    assert shard.row_groups is not None, "not a Parquet shard"
    first_group, end_group = shard.row_groups
    try:
        parquet = pq.ParquetFile(shard.path)
    except _READ_ERRORS as exc:
        yield BadLine(
            shard.source,
            shard.path,
            shard.first_line,
            "corrupt_file",
            f"not a readable Parquet file: {type(exc).__name__}: {exc}",
            "",
        )
        return
    present = set(parquet.schema_arrow.names)
    columns = [name for name in wanted_columns(fields) if name in present]
    row = shard.first_line
    for group in range(first_group, end_group):
        num_rows = parquet.metadata.row_group(group).num_rows
        group_first_row = row
        try:
            for record in _iter_row_group(parquet, group, columns):
                yield _row_to_item(record, row, shard, fields)
                row += 1
        except _READ_ERRORS as exc:
            yield BadLine(
                shard.source,
                shard.path,
                row,
                "corrupt_file",
                f"row group {group} (rows {group_first_row}-{group_first_row + num_rows - 1}) "
                f"is unreadable from row {row}: {type(exc).__name__}: {exc}",
                "",
            )
        row = group_first_row + num_rows

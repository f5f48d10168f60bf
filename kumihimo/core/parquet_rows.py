"""Parquet rows as records (kumihimo.core.record_types), the Parquet reader of kumihimo.core.records: one row group at a time, in batches, only the
columns asked for, so memory stays bounded by one batch whatever the file size."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kumihimo.core.record_types import EXCERPT_CHARS, BadRecord, Record

BATCH_ROWS = 1024
# What pyarrow raises for a file or a row group it cannot decode (bad footer, truncated page...).
READ_ERRORS = (OSError, pa.ArrowException, EOFError)


def _column_values(column: pa.Array) -> list[Any]:
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        # pyarrow does not check UTF-8 when it reads a string column; give the bytes to the caller's check
        return column.cast(pa.binary()).to_pylist()


def _iter_row_group(
    parquet: pq.ParquetFile, group: int, columns: list[str] | None
) -> Iterator[dict[str, Any]]:
    """The rows of one row group as {column: value}; nulls stay as None, absent columns are left out."""
    for batch in parquet.iter_batches(
        batch_size=BATCH_ROWS, row_groups=[group], columns=columns, use_threads=False
    ):
        values = [_column_values(batch.column(i)) for i in range(batch.num_columns)]
        names = batch.schema.names
        for row in range(batch.num_rows):
            yield {name: column[row] for name, column in zip(names, values)}


def iter_parquet(
    path: str,
    row_groups: tuple[int, int] | None = None,
    columns: list[str] | None = None,
    first_row: int = 1,
) -> Iterator[Record | BadRecord]:
    """Every row of row groups [first, end) (None: all) gives one Record; `first_row` is the 1-based
    number of the first one in the file. A file that is not readable Parquet is one `corrupt_file`
    BadRecord; so is a row group that fails to decode, and later row groups are still read. String
    values with invalid UTF-8 come back as bytes."""
    try:
        parquet = pq.ParquetFile(path)
    except READ_ERRORS as exc:
        detail = f"not a readable Parquet file: {type(exc).__name__}: {exc}"
        yield BadRecord(first_row, "corrupt_file", detail, "")
        return
    if columns is not None:
        present = set(parquet.schema_arrow.names)
        columns = [name for name in columns if name in present]
    first_group, end_group = row_groups if row_groups is not None else (0, parquet.metadata.num_row_groups)
    row = first_row
    for group in range(first_group, end_group):
        num_rows = parquet.metadata.row_group(group).num_rows
        group_first_row = row
        try:
            for record in _iter_row_group(parquet, group, columns):
                yield Record(row, record, json.dumps(record, ensure_ascii=False, default=str)[:EXCERPT_CHARS])
                row += 1
        except READ_ERRORS as exc:
            detail = (
                f"row group {group} (rows {group_first_row}-{group_first_row + num_rows - 1}) "
                f"is unreadable from row {row}: {type(exc).__name__}: {exc}"
            )
            yield BadRecord(row, "corrupt_file", detail, "")
        row = group_first_row + num_rows

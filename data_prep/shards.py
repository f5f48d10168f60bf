"""The shards of a data_prep run: which input files the sources name, how each is cut into shards
(whole compressed files and WARC files, byte ranges of large plain JSONL, runs of Parquet row groups),
and reading any shard through the reader of its format (jsonl_io, parquet_io, warc_io), all giving the
document types of data_prep/documents.py. The shard order (source, file, offset) decides dedup winners.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from kumihimo.core.errors import UserError
from kumihimo.core.files import matching_files
from kumihimo.core.jsonl_rows import open_binary
from kumihimo.core.records import file_format
from kumihimo.data_prep import warc_io
from kumihimo.data_prep.config import DataPrepConfig, InputConfig
from kumihimo.data_prep.documents import BadLine, Document, Dropped, Shard
from kumihimo.data_prep.jsonl_io import line_starts, read_jsonl_shard

COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


def expand_source_paths(patterns: list[str], source: str) -> list[str]:
    """The files the globs of one source match, each once, in glob order; a glob matching nothing is an error."""
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
            kind = file_format(path)  # an unsupported suffix fails here, before any worker starts
            if kind == "warc":
                shards.append(Shard(len(shards), source.name, path, 0, None, 1))
                continue
            if kind == "parquet":
                from kumihimo.data_prep import parquet_io  # pyarrow is loaded only for Parquet input

                for first, end, first_row in parquet_io.row_group_runs(
                    path, config.input, config.input.shard_bytes
                ):
                    shards.append(Shard(len(shards), source.name, path, 0, None, first_row, (first, end)))
                continue
            if path.endswith((".zst", ".zstd")):
                open_binary(path).close()  # fail now, not in a worker, if zstandard is missing
            size = os.path.getsize(path)
            if path.endswith(COMPRESSED_SUFFIXES) or size <= config.input.shard_bytes:
                shards.append(Shard(len(shards), source.name, path, 0, None, 1))
                continue
            cuts = line_starts(path, size, config.input.shard_bytes)
            for i, (offset, line) in enumerate(cuts):
                end = cuts[i + 1][0] if i + 1 < len(cuts) else None
                shards.append(Shard(len(shards), source.name, path, offset, end, line))
    return shards


def read_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine | Dropped]:
    """Parse a shard's records; every line (row, WARC response record) gives exactly one Document,
    BadLine or Dropped (blank lines and non-response WARC records: none)."""
    if shard.row_groups is not None:
        from kumihimo.data_prep import parquet_io  # pyarrow is loaded only for Parquet input

        yield from parquet_io.read_parquet_shard(shard, fields)
        return
    if file_format(shard.path) == "warc":
        yield from warc_io.read_warc_shard(shard, fields)
        return
    yield from read_jsonl_shard(shard, fields)

"""data_prep on Parquet input: row-group shards, per-row quarantine, JSONL parity, resume, corrupt files.

The corpus is the JSONL test corpus of test_data_prep_pipeline.py, its JSON objects turned into Arrow
tables and written twice: as Parquet (several row groups per file) and as JSONL lines of the same rows.
Both runs must give byte-identical outputs once file names are normalised.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_prep_pipeline import EXPECTED, crash_then_resume, output_files, read_records, write_corpus

from kumihimo.core import parquet_rows
from kumihimo.data_prep.config import DataPrepConfig, SourceConfig
from kumihimo.data_prep.documents import BadLine, Document
from kumihimo.data_prep.pipeline import curate
from kumihimo.data_prep.shards import plan_shards, read_shard

# the rows of the JSONL corpus with valid JSON objects: "no-text" becomes a null, "empty" stays blank
NUM_NULL_OR_EMPTY = 2
NUM_ODD_ROWS = 2  # rows in each of the two odd files: integer text column, no text column at all
SCHEMA = pa.schema(
    [
        ("content", pa.string()),
        ("doc_id", pa.string()),
        ("link", pa.string()),
        ("crawl_date", pa.timestamp("s")),
        ("unused", pa.string()),
    ]
)
CRAWL_DATE = datetime.datetime(2024, 5, 1, 12, 30)


def _corpus_tables(orig: Path) -> dict[str, pa.Table]:
    """Stem -> table, with the field names renamed (text -> content, id -> doc_id, url -> link)."""
    tables = {}
    for path in sorted(orig.glob("*.jsonl*")):
        if path.name == "eval.jsonl":
            continue
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        rows = []
        for raw in data.splitlines():
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # a broken line has no Parquet form
            if isinstance(record, dict):
                rows.append(
                    {
                        "content": record.get("text"),
                        "doc_id": record["id"],
                        "link": record.get("url"),
                        "crawl_date": CRAWL_DATE,
                        "unused": "x" * 5000,
                    }
                )
        tables[path.name.split(".")[0]] = pa.Table.from_pylist(rows, schema=SCHEMA)
    ids = pa.array(["odd-0", "odd-1"])
    tables["en_z_int_text"] = pa.table({"content": pa.array([7, 8], pa.int64()), "doc_id": ids})
    tables["en_z_no_text"] = pa.table({"doc_id": ids, "link": pa.array(["https://a.example/", None])})
    return tables


def write_parquet_and_jsonl(root: Path) -> tuple[DataPrepConfig, DataPrepConfig]:
    """The same rows as Parquet (2 rows per row group) and as JSONL; a config for each."""
    base = write_corpus(root / "orig")
    base.input.text_field, base.input.id_field, base.input.url_field = "content", "doc_id", "link"
    base.input.meta_fields = ["crawl_date"]
    base.input.shard_bytes = 1024
    configs = []
    for kind in ("parquet", "jsonl"):
        folder = root / kind
        folder.mkdir()
        for stem, table in _corpus_tables(root / "orig").items():
            if kind == "parquet":
                pq.write_table(table, folder / f"{stem}.parquet", row_group_size=2)
                continue
            lines = [json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in table.to_pylist()]
            (folder / f"{stem}.jsonl").write_text("".join(lines), encoding="utf-8")
        config = dataclasses.replace(base, output_dir=str(root / f"out_{kind}"))
        config.input = dataclasses.replace(
            base.input,
            sources=[
                SourceConfig(name="ja", paths=[str(folder / f"ja_*.{kind}")]),
                SourceConfig(name="en", paths=[str(folder / f"en*.{kind}")], weight_multiplier=2.0),
            ],
        )
        configs.append(config)
    return configs[0], configs[1]


def _without_raw(value):
    if isinstance(value, dict):
        return {k: _without_raw(v) for k, v in value.items() if k != "raw"}
    return [_without_raw(v) for v in value] if isinstance(value, list) else value


def normalised(config: DataPrepConfig) -> dict[str, bytes]:
    """output_files with the output folder, the input folder and the file suffix made neutral, and
    without the `raw` excerpts of quarantined records: a JSONL line holds every field, a Parquet row
    only the columns read."""
    out = Path(config.output_dir)
    folder = Path(config.input.sources[0].paths[0]).parent
    files = {}
    for name, data in output_files(out).items():
        data = (
            data.replace(str(out).encode(), b"OUT")
            .replace(str(folder).encode(), b"IN")
            .replace(b".parquet", b".FILE")
            .replace(b".jsonl", b".FILE")
        )
        if name == "report.json":
            data = json.dumps(_without_raw(json.loads(data))).encode()
        elif name.startswith("quarantine/"):
            data = b"".join(
                json.dumps(_without_raw(json.loads(line))).encode() + b"\n" for line in data.splitlines()
            )
        files[name] = data
    return files


@pytest.fixture(scope="module")
def parquet_run(tmp_path_factory):
    parquet_config, jsonl_config = write_parquet_and_jsonl(tmp_path_factory.mktemp("corpus"))
    return parquet_config, jsonl_config, curate(parquet_config)


def test_every_row_ends_in_exactly_one_place(parquet_run):
    config, _, result = parquet_run
    out = Path(config.output_dir)
    kept = read_records(out / "curated/ja.jsonl") + read_records(out / "curated/en.jsonl")
    dropped = read_records(out / "dropped/ja.jsonl") + read_records(out / "dropped/en.jsonl")
    quarantined = read_records(out / "quarantine/ja.jsonl") + read_records(out / "quarantine/en.jsonl")
    assert sorted(r["id"] for r in kept + dropped) == sorted(EXPECTED)
    assert {r["id"] for r in kept} == {k for k, v in EXPECTED.items() if v == "kept"}
    for record in dropped:
        assert (record["stage"], record["reason"]) == EXPECTED[record["id"]], record["id"]
    num_bad = NUM_NULL_OR_EMPTY + 2 * NUM_ODD_ROWS
    assert len(quarantined) == num_bad == result.num_quarantined
    assert result.num_input_lines == len(EXPECTED) + num_bad
    assert result.num_kept + result.num_dropped + result.num_quarantined == result.num_input_lines
    by_id = {r["id"]: r for r in kept}
    assert by_id["ja0"]["meta"]["url"] == "https://blog.example.jp/a"  # url_field=link
    assert by_id["ja0"]["meta"]["crawl_date"] == "2024-05-01 12:30:00"  # a timestamp column, as JSON
    assert by_id["ja0"]["meta"]["file"].endswith("ja_a.parquet") and by_id["ja0"]["meta"]["line"] == 1


def test_bad_rows_are_quarantined_with_file_row_and_reason(parquet_run):
    config, _, _ = parquet_run
    out = Path(config.output_dir)
    records = read_records(out / "quarantine/ja.jsonl") + read_records(out / "quarantine/en.jsonl")
    found = sorted((Path(r["file"]).name, r["line"], r["reason"], r["detail"]) for r in records)
    assert found == [
        ("en.parquet", 4, "empty_text", "'content' is empty"),
        ("en_z_int_text.parquet", 1, "text_not_string", "'content' is a int"),
        ("en_z_int_text.parquet", 2, "text_not_string", "'content' is a int"),
        ("en_z_no_text.parquet", 1, "missing_text_field", "no 'content' field"),
        ("en_z_no_text.parquet", 2, "missing_text_field", "no 'content' field"),
        ("ja_a.parquet", 3, "text_not_string", "'content' is null"),
    ]
    assert all(r["source"] in ("ja", "en") and r["raw"] for r in records)


def test_parquet_gives_the_same_outputs_as_the_same_rows_in_jsonl(parquet_run):
    parquet_config, jsonl_config, _ = parquet_run
    curate(jsonl_config)
    mine, reference = normalised(parquet_config), normalised(jsonl_config)
    assert mine.keys() == reference.keys()
    for name in reference:
        assert mine[name] == reference[name], name
    assert len(plan_shards(parquet_config)) != len(plan_shards(jsonl_config))  # different cuts, same result


def test_row_groups_are_split_into_shards_reading_only_the_needed_columns(tmp_path, monkeypatch):
    config, _ = write_parquet_and_jsonl(tmp_path)
    path = str(tmp_path / "parquet" / "ja_a.parquet")
    config.input.sources = [SourceConfig(name="ja", paths=[path])]
    num_row_groups = pq.ParquetFile(path).num_row_groups
    assert num_row_groups == 3
    read = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        read.append((tuple(kwargs["row_groups"]), tuple(kwargs["columns"])))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    for shard_bytes, expected in ((1024, [(0, 1), (1, 2), (2, 3)]), (1 << 30, [(0, 3)])):
        config.input.shard_bytes = shard_bytes
        shards = plan_shards(config)
        assert [s.row_groups for s in shards] == expected
        items = [item for shard in shards for item in read_shard(shard, config.input)]
        assert [item.line for item in items] == [1, 2, 3, 4, 5, 6]
        assert [item.doc_id for item in items if isinstance(item, Document)] == [
            "ja0",
            "ja1",
            "ja-exact",
            "ja-short",
            "ja-spam",
        ]
    assert {columns for _, columns in read} == {("content", "doc_id", "link", "crawl_date")}  # not "unused"
    assert all(len(groups) == 1 for groups, _ in read)  # one row group in memory at a time


def test_resume_after_crash_redoes_only_unfinished_parquet_shards(tmp_path, monkeypatch, parquet_run):
    config, _ = write_parquet_and_jsonl(tmp_path)
    crash_then_resume(config, monkeypatch)
    reference_config, _, _ = parquet_run
    assert normalised(config) == normalised(reference_config)


def test_corrupt_parquet_files_are_quarantined_and_the_run_goes_on(tmp_path):
    config, _ = write_parquet_and_jsonl(tmp_path)
    folder = tmp_path / "parquet"
    whole = (folder / "ja_b.parquet").read_bytes()
    (folder / "ja_b.parquet").write_bytes(whole[: len(whole) // 2])  # footer gone
    (folder / "ja_c.parquet").write_bytes(b"PAR1 this is not a Parquet file")
    result = curate(config)
    assert result.quarantined["corrupt_file"] == 2
    records = [
        r
        for r in read_records(Path(config.output_dir) / "quarantine/ja.jsonl")
        if r["reason"] == "corrupt_file"
    ]
    assert sorted(Path(r["file"]).name for r in records) == ["ja_b.parquet", "ja_c.parquet"]
    assert all(r["line"] == 1 and "not a readable Parquet file" in r["detail"] for r in records)
    assert result.num_kept > 0


def test_an_unreadable_row_group_is_one_quarantine_event_and_later_ones_are_read(tmp_path, monkeypatch):
    config, _ = write_parquet_and_jsonl(tmp_path)
    config.input.sources = [SourceConfig(name="ja", paths=[str(tmp_path / "parquet" / "ja_a.parquet")])]
    config.input.shard_bytes = 1 << 30
    real = parquet_rows._iter_row_group

    def broken_middle(parquet, group, columns):
        if group == 1:
            raise OSError("Corrupt snappy compressed data.")
        yield from real(parquet, group, columns)

    monkeypatch.setattr(parquet_rows, "_iter_row_group", broken_middle)
    (shard,) = plan_shards(config)
    items = list(read_shard(shard, config.input))
    assert [item.line for item in items] == [1, 2, 3, 5, 6]
    assert isinstance(items[2], BadLine) and items[2].reason == "corrupt_file"
    assert "row group 1 (rows 3-4)" in items[2].detail


def test_invalid_utf8_in_a_string_column_is_quarantined_row_by_row(tmp_path):
    # pyarrow writes the bytes of a string column unchecked, as some producers do
    data = pa.array([b"ok text", b"\xff\xfe broken"], pa.binary())
    text = pa.Array.from_buffers(pa.string(), len(data), data.buffers())
    pq.write_table(pa.table({"text": text, "id": ["a", "b"]}), tmp_path / "x.parquet")
    config = DataPrepConfig()
    config.input.sources = [SourceConfig(name="x", paths=[str(tmp_path / "x.parquet")])]
    (shard,) = plan_shards(config)
    good, bad = read_shard(shard, config.input)
    assert isinstance(good, Document) and good.text == "ok text" and good.doc_id == "a"
    assert isinstance(bad, BadLine) and bad.reason == "invalid_utf8" and bad.line == 2

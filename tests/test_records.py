"""kumihimo.core.records, the one reader: every format gives the same records to every stage that reads."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from kumihimo.core.errors import UserError
from kumihimo.core.record_types import BadRecord, Record
from kumihimo.core.records import file_format, iter_records, read_records
from kumihimo.core.warc import warc_response, write_warc
from kumihimo.data_prep.config import DecontamConfig
from kumihimo.data_prep.decontam import build_eval_index
from kumihimo.tokenizer.evaluate import read_documents
from kumihimo.tokenizer.train import iter_documents

ROWS = [
    {"id": "a", "text": "吾輩は猫である。名前はまだ無い。", "lang": "ja"},
    {"id": "b", "text": "The quick brown fox jumps over the lazy dog.", "lang": "en"},
    {"id": "c", "text": "どこで生れたかとんと見当がつかぬ。", "lang": "ja"},
]


def write_all_formats(root: Path) -> dict[str, Path]:
    lines = b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in ROWS)
    paths = {
        "jsonl": root / "d.jsonl",
        "gz": root / "d.jsonl.gz",
        "zst": root / "d.jsonl.zst",
        "parquet": root / "d.parquet",
        "warc": root / "d.warc.gz",
    }
    paths["jsonl"].write_bytes(lines.replace(b"\n", b"\n\n", 1))  # a blank line is no record
    paths["gz"].write_bytes(gzip.compress(lines))
    paths["zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.Table.from_pylist(ROWS), paths["parquet"], row_group_size=2)
    pages = [
        warc_response(f"https://x.example.jp/{r['id']}", f"<html lang=ja><p>{r['text']}</p></html>".encode())
        for r in ROWS
    ]
    write_warc(paths["warc"], pages)
    return paths


def test_every_format_gives_the_same_records(tmp_path):
    paths = write_all_formats(tmp_path)
    for kind in ("jsonl", "gz", "zst", "parquet"):
        items = list(iter_records(str(paths[kind])))
        assert all(isinstance(item, Record) for item in items), kind
        assert [item.fields for item in items] == ROWS, kind
    assert [item.position for item in iter_records(str(paths["jsonl"]))] == [1, 3, 4]
    assert [item.position for item in iter_records(str(paths["parquet"]))] == [1, 2, 3]
    assert list(iter_records(str(paths["parquet"]), columns=["text", "missing"]))[0].fields == {
        "text": ROWS[0]["text"]
    }
    # WARC: every page passes the pre-check (lang=ja); its text is the page's main text
    assert [r["text"] for _, r in read_records(str(paths["warc"]))] == [r["text"] for r in ROWS]


def test_the_stages_read_every_format(tmp_path):
    paths = write_all_formats(tmp_path)
    japanese = [ROWS[0]["text"], ROWS[2]["text"]]
    for kind in ("jsonl", "gz", "zst", "parquet"):
        assert list(iter_documents(paths[kind], "text", "ja")) == japanese, kind
        assert list(read_documents(paths[kind], "text", max_documents=2)) == [
            ROWS[0]["text"],
            ROWS[1]["text"],
        ]
        index = build_eval_index(DecontamConfig(eval_paths=[str(paths[kind])], eval_fields=["text"]))
        assert len(index) > 0, kind
    assert len(list(iter_documents(paths["warc"], "text", None))) == 3


def test_an_unsupported_suffix_is_one_clear_error_everywhere(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("id,text\na,hello\n", encoding="utf-8")
    expected = r"rows\.csv: unsupported file type; use one of \.jsonl, "
    with pytest.raises(UserError, match=expected):
        list(iter_documents(path, "text", None))
    with pytest.raises(UserError, match=expected + r".*\.txt"):
        list(read_documents(path))
    with pytest.raises(UserError, match=expected):
        build_eval_index(DecontamConfig(eval_paths=[str(path)]))
    assert file_format("A.JSONL.GZ") == "jsonl" and file_format("x.warc.gz") == "warc"
    with pytest.raises(UserError, match=r"x\.txt: unsupported"):
        file_format("x.txt")  # text only where the caller accepts it


def test_bad_records_are_events_when_lenient_and_errors_when_strict(tmp_path):
    path = tmp_path / "bad.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "ok"}\n{broken\n[1]\n\xff\n')[:-6])  # and a cut gzip trailer
    items = list(iter_records(str(path)))
    assert isinstance(items[0], Record)
    assert [(i.position, i.reason) for i in items[1:] if isinstance(i, BadRecord)] == [
        (2, "malformed_json"),
        (3, "not_an_object"),
        (4, "invalid_utf8"),
        (5, "corrupt_file"),
    ]
    with pytest.raises(
        UserError, match=r"bad\.jsonl\.gz:2 is not valid JSON \(.*\); fix or remove that record"
    ):
        list(read_records(str(path)))
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz:2 is not valid JSON"):
        list(iter_documents(path, "text", None))

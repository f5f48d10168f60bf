"""Common Crawl WARC input: Japanese pre-check, three encodings, main text, quarantine, resume, executors.

The WARC files are written here from HTML authored here: Japanese pages in UTF-8 (lang="ja"), Shift_JIS
and EUC-JP (no lang attribute, a Japanese title), an English page, a PNG, a 404, a page in no Japanese
encoding, and a record cut short at the end of the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
from pathlib import Path

import pytest
from test_data_prep_pipeline import EN, JA, crash_then_resume, read_records

from kumihimo.core.errors import UserError
from kumihimo.core.record_types import BadRecord, Record, Skipped
from kumihimo.core.warc import (
    decode_japanese,
    iter_warc,
    looks_japanese,
    page_title,
    warc_response,
    write_warc,
)
from kumihimo.data_prep.config import DataPrepConfig, SourceConfig
from kumihimo.data_prep.pipeline import curate
from kumihimo.data_prep.shards import plan_shards

DATE = "2024-03-05T06:07:08Z"


def page(title: str, body: str, lang: str | None = None, charset: str | None = None) -> str:
    """An HTML page with navigation and a footer around the article, as web pages have."""
    lang_attr = f' lang="{lang}"' if lang else ""
    meta = f'<meta charset="{charset}">' if charset else ""
    paragraphs = "".join(f"<p>{html.escape(line)}</p>\n" for line in body.split("\n") if line.strip())
    return (
        f"<!DOCTYPE html><html{lang_attr}><head>{meta}<title>{html.escape(title)}</title></head><body>\n"
        '<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About</a></li></ul></nav>\n'
        f"<main><article><h1>{html.escape(title)}</h1>\n{paragraphs}</article></main>\n"
        "<footer>Copyright 2024 Example</footer></body></html>"
    )


def first_line(text: str) -> str:
    return text.split("\n")[0]


def write_crawl(path: Path) -> list[bytes]:
    """One WARC file with every kind of record; returns the records as written (uncompressed)."""
    records = [
        warc_response(
            "https://a.example.jp/utf8", page("春の庭しごと", JA[0], lang="ja").encode(), date=DATE
        ),
        warc_response(
            "https://b.example.jp/sjis",
            page("週末のパン作り", JA[1], charset="Shift_JIS").encode("cp932"),
            date=DATE,
        ),
        warc_response(
            "https://c.example.jp/eucjp",
            page("地域の防災訓練", JA[2], charset="EUC-JP").encode("euc_jp"),
            date=DATE,
        ),
        warc_response(
            "https://d.example.com/en", page("Baking at home", EN[0], lang="en").encode(), date=DATE
        ),
        warc_response("https://a.example.jp/logo.png", b"\x89PNG\r\n\x1a\n", content_type="image/png"),
        warc_response("https://a.example.jp/gone", b"<html lang=ja>not found</html>", status=404),
        warc_response("https://e.example.jp/broken", b'<html lang="ja"><title>x</title>\x81\x20\xff</html>'),
        warc_response("https://f.example.jp/cut", page("途中で切れたページ", JA[3], lang="ja").encode()),
    ]
    compressed = [gzip.compress(r, mtime=0) for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    # the last record is cut in the middle of its gzip member, as a crawl killed mid-write leaves it
    path.write_bytes(b"".join(compressed[:-1]) + compressed[-1][: len(compressed[-1]) // 2])
    return records


def offsets(path: Path) -> list[int]:
    """Byte offsets of the gzip members of a .warc.gz file (one per record)."""
    data, found, start = path.read_bytes(), [], 0
    while (start := data.find(b"\x1f\x8b\x08", start)) != -1:
        found.append(start)
        start += 3
    return found


def test_pre_check_and_decoding():
    assert decode_japanese("日本語".encode("cp932")) == ("日本語", "shift_jis")
    assert decode_japanese("日本語".encode("euc_jp")) == ("日本語", "euc-jp")
    assert decode_japanese("ひらがな".encode("euc_jp")) == ("ひらがな", "euc-jp")
    assert decode_japanese("ｶﾀｶﾅです".encode("cp932")) == ("ｶﾀｶﾅです", "shift_jis")  # no EUC-JP reading
    assert decode_japanese("ｶﾀｶﾅ".encode("euc_jp"), "EUC-JP") == ("ｶﾀｶﾅ", "euc-jp")  # declared wins
    assert decode_japanese("日本語".encode("cp932"), "iso-8859-1") == ("日本語", "shift_jis")  # not Japanese
    assert decode_japanese(b"\x81\x20 \xff") is None  # a lead byte without its trail byte
    assert looks_japanese(b"<HTML class='x' LANG='ja-JP'>", None)
    assert not looks_japanese(b"<html lang='jav'>", None)  # Javanese
    assert looks_japanese(b"", ("お知らせ", "utf-8"))
    assert not looks_japanese(b"", ("北京大学", "utf-8"))  # kanji only, UTF-8: may be Chinese
    assert looks_japanese(b"", ("東京大学", "shift_jis"))
    assert page_title("<title>A &amp; B\n  テスト</title>".encode()) == ("A & B テスト", "utf-8")


@pytest.mark.parametrize("extractor", ["resiliparse", "trafilatura"])
def test_every_record_is_a_page_a_skip_or_a_quarantine_event_with_its_offset(tmp_path, extractor):
    path = tmp_path / "crawl.warc.gz"
    write_crawl(path)
    items = list(iter_warc(str(path), extractor=extractor))
    starts = offsets(path)
    assert [item.position for item in items] == starts
    pages = [item for item in items if isinstance(item, Record)]
    assert [p.fields["encoding"] for p in pages] == ["utf-8", "shift_jis", "euc-jp"]
    for record, body, title in zip(pages, JA, ["春の庭しごと", "週末のパン作り", "地域の防災訓練"]):
        assert first_line(body) in record.fields["text"]
        assert "Copyright" not in record.fields["text"] and "About" not in record.fields["text"]
        assert record.fields["title"] == title and record.fields["date"] == DATE
        assert record.fields["id"].startswith("<urn:uuid:")
    assert pages[1].fields["url"] == "https://b.example.jp/sjis"
    skipped = [(i.stage, i.reason) for i in items if isinstance(i, Skipped)]
    assert skipped == [("warc", "not_japanese"), ("warc", "not_html"), ("warc", "http_status")]
    bad = [i for i in items if isinstance(i, BadRecord)]
    assert [b.reason for b in bad] == ["undecodable_page", "truncated_record"]
    assert bad[0].position == starts[6] and f"byte offset {starts[6]}" in bad[0].detail
    assert bad[1].position == starts[7] and "cut short" in bad[1].detail


def test_without_the_pre_check_every_html_page_is_extracted(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    write_crawl(path)
    items = list(iter_warc(str(path), japanese_precheck=False))
    assert first_line(EN[0]) in items[3].fields["text"]


def test_a_file_that_is_not_gzip_after_a_good_record_is_quarantined_from_there(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    good = gzip.compress(warc_response("https://a.example.jp/", page("テスト", JA[0], lang="ja").encode()))
    path.write_bytes(good + b"this is not gzip at all" * 10)
    items = list(iter_warc(str(path)))
    assert isinstance(items[0], Record)
    assert isinstance(items[-1], BadRecord) and items[-1].reason == "corrupt_file"


def warc_config(root: Path) -> DataPrepConfig:
    write_crawl(root / "crawl" / "a.warc.gz")
    write_warc(
        root / "crawl" / "b.warc.gz",
        [
            warc_response("https://g.example.jp/pii", page("お問い合わせ", JA[4], lang="ja").encode("utf-8")),
            warc_response(
                "https://h.example.jp/dup", page("春の庭しごと（転載）", JA[0], lang="ja").encode()
            ),
        ],
    )
    write_warc(
        root / "crawl" / "c.warc.gz",
        [warc_response("https://i.example.jp/", page("台所だより", JA[3]).encode())],
    )
    config = DataPrepConfig(output_dir=str(root / "out"), num_workers=1)
    config.input.sources = [SourceConfig(name="cc", paths=[str(root / "crawl" / "*.warc.gz")])]
    return config


def test_curate_warc_end_to_end(tmp_path):
    config = warc_config(tmp_path)
    assert len(plan_shards(config)) == 3  # one shard per WARC file
    result = curate(config)
    out = Path(config.output_dir)
    curated = read_records(out / "curated/cc.jsonl")
    by_url = {r["meta"]["url"]: r for r in curated}
    assert sorted(by_url) == [
        "https://a.example.jp/utf8",
        "https://b.example.jp/sjis",
        "https://c.example.jp/eucjp",
        "https://g.example.jp/pii",
        "https://i.example.jp/",
    ]  # h.example.jp repeats the first page
    kept = by_url["https://b.example.jp/sjis"]
    assert kept["meta"]["title"] == "週末のパン作り" and kept["meta"]["date"] == DATE
    assert first_line(JA[1]) in kept["text"] and kept["lang"] == "ja"
    quarantined = read_records(out / "quarantine/cc.jsonl")
    assert sorted(r["reason"] for r in quarantined) == ["truncated_record", "undecodable_page"]
    starts = offsets(tmp_path / "crawl" / "a.warc.gz")
    assert {(Path(r["file"]).name, r["line"]) for r in quarantined} == {
        ("a.warc.gz", starts[6]),
        ("a.warc.gz", starts[7]),
    }
    dropped = read_records(out / "dropped/cc.jsonl")
    reasons = sorted((r["stage"], r["reason"]) for r in dropped)
    assert reasons == [
        ("dedup", "near_duplicate"),  # the same article under its own <h1>
        ("warc", "http_status"),
        ("warc", "not_html"),
        ("warc", "not_japanese"),
    ]
    assert result.quarantined == {"truncated_record": 1, "undecodable_page": 1}
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| warc | 3 |" in report and "| warc | not_japanese | 1 |" in report


def test_warc_run_resumes_per_file_and_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    reference = warc_config(tmp_path / "ref")
    curate(reference)
    config = warc_config(tmp_path / "resumed")
    crash_then_resume(config, monkeypatch)
    for name in ("curated/cc.jsonl", "dropped/cc.jsonl"):
        mine = (
            (Path(config.output_dir) / name)
            .read_text(encoding="utf-8")
            .replace(str(tmp_path / "resumed"), "R")
        )
        theirs = (
            (Path(reference.output_dir) / name)
            .read_text(encoding="utf-8")
            .replace(str(tmp_path / "ref"), "R")
        )
        assert mine == theirs, name


def test_datatrove_local_executor_curates_warc_files_as_tasks(tmp_path):
    pytest.importorskip("datatrove")
    reference = warc_config(tmp_path / "ref")
    curate(reference)
    config = warc_config(tmp_path / "dt")
    config = dataclasses.replace(
        config, executor=dataclasses.replace(config.executor, kind="datatrove-local", tasks=2, workers=1)
    )
    curate(config)
    mine = (Path(config.output_dir) / "curated/cc.jsonl").read_text(encoding="utf-8")
    theirs = (Path(reference.output_dir) / "curated/cc.jsonl").read_text(encoding="utf-8")
    assert mine.replace(str(tmp_path / "dt"), "R") == theirs.replace(str(tmp_path / "ref"), "R")


def test_an_unsupported_input_suffix_is_one_clear_error(tmp_path):
    (tmp_path / "pages.csv").write_text("text\nhello\n", encoding="utf-8")
    config = DataPrepConfig(output_dir=str(tmp_path / "out"))
    config.input.sources = [SourceConfig(name="x", paths=[str(tmp_path / "pages.csv")])]
    with pytest.raises(
        UserError, match=r"pages\.csv: unsupported file type; use one of \.jsonl, .*\.warc\.gz"
    ):
        plan_shards(config)

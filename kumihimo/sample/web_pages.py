"""A small Common Crawl-like WARC file for the quickstart, built from the sample's own sentence material.

``write_sample_warc(path)`` writes, deterministically (same bytes on every run): Japanese pages in UTF-8
(``<html lang="ja">``), Shift_JIS and EUC-JP (no lang attribute, a Japanese title), each with navigation
and a footer around the article; English pages (dropped by the Japanese pre-check); an image record; and
a record cut short at the end of the file (quarantined). Nothing is shipped: the pages are composed from
``_material_ja`` / ``_material_en`` when the quickstart runs, so the package stays small.
"""

from __future__ import annotations

import gzip
import html
import random
from pathlib import Path

from kumihimo.core.files import write_bytes_atomic
from kumihimo.core.warc import warc_response
from kumihimo.sample.make_corpus import _clean_drafts

SEED = 20251204
NUM_JAPANESE = 12
NUM_ENGLISH = 4
ENCODINGS = [("utf-8", "utf-8"), ("Shift_JIS", "cp932"), ("EUC-JP", "euc_jp")]
DATE = "2024-11-02T09:30:00Z"


def _html(title: str, paragraphs: list[str], lang: str | None, charset: str) -> str:
    lang_attr = f' lang="{lang}"' if lang else ""
    body = "".join(f"<p>{html.escape(p)}</p>\n" for p in paragraphs)
    return (
        f'<!DOCTYPE html>\n<html{lang_attr}><head><meta charset="{charset}"><title>{html.escape(title)}</title>'
        '</head><body>\n<header><nav><a href="/">Home</a> | <a href="/archive">Archive</a> | '
        '<a href="/contact">Contact</a></nav></header>\n'
        f"<main><article><h1>{html.escape(title)}</h1>\n{body}</article></main>\n"
        "<aside><h2>Popular</h2><ul><li><a href='/1'>1</a></li><li><a href='/2'>2</a></li></ul></aside>\n"
        "<footer><p>(c) 2024 example</p></footer></body></html>\n"
    )


def sample_warc_records() -> list[bytes]:
    """The uncompressed WARC records of the sample, in file order (the last one is cut when written)."""
    rng = random.Random(SEED)
    records = []
    for i, draft in enumerate(_clean_drafts(rng, "ja", 0, NUM_JAPANESE)[:NUM_JAPANESE]):
        charset, codec = ENCODINGS[i % len(ENCODINGS)]
        lang = "ja" if codec == "utf-8" else None
        page = _html(draft.title, ["".join(p) for p in draft.paragraphs if p], lang, charset)
        records.append(warc_response(f"https://web.example.jp/{i:02d}.html", page.encode(codec), date=DATE))
    for i, draft in enumerate(_clean_drafts(rng, "en", 0, NUM_ENGLISH)[:NUM_ENGLISH]):
        page = _html(draft.title, [" ".join(p) for p in draft.paragraphs if p], "en", "utf-8")
        records.append(warc_response(f"https://web.example.com/{i:02d}.html", page.encode(), date=DATE))
    records.append(
        warc_response("https://web.example.jp/logo.png", b"\x89PNG\r\n\x1a\n", content_type="image/png")
    )
    records.append(records[0].replace(b"web.example.jp/00", b"web.example.jp/cut"))
    return records


def write_sample_warc(path: str | Path) -> Path:
    """Write the sample as a .warc.gz (one gzip member per record; the last one cut in half)."""
    members = [gzip.compress(record, compresslevel=9, mtime=0) for record in sample_warc_records()]
    members[-1] = members[-1][: len(members[-1]) // 2]
    write_bytes_atomic(path, b"".join(members))
    return Path(path)

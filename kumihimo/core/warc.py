"""Common Crawl WARC files -> Japanese pages with their main text, url, title and crawl date.

Per response record, cheapest test first (Swallow corpus, Okazaki et al. 2024): only HTTP 200 HTML
pages are looked at; a page passes the Japanese pre-check when its `<html>` tag says `lang="ja"` or its
`<title>` looks Japanese (kana, or kanji in a Shift_JIS/EUC-JP title); only those are decoded (the
declared charset when it is a Japanese one, else UTF-8, then Shift_JIS, then EUC-JP, the first that
decodes cleanly) and handed to the main-text extractor.
Most of Common Crawl fails the pre-check, so most pages are never decoded or parsed.

The WARC block of every record is checked against its Content-Length: a truncated record, a page that
decodes in none of the three encodings, an extractor crash and an unreadable rest of file come back as
BadRecords carrying the record's byte offset in the file, for the quarantine.
"""

from __future__ import annotations

import gzip
import html
import os
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fastwarc.warc import ArchiveIterator, WarcRecordType

from kumihimo.core.errors import UserError
from kumihimo.core.files import write_bytes_atomic
from kumihimo.core.record_types import EXCERPT_CHARS, BadRecord, Record, Skipped

EXTRACTORS = ("resiliparse", "trafilatura")
LANG_JA = re.compile(rb"""<html[^>]*\slang\s*=\s*["']?ja(?![a-z])""", re.IGNORECASE)
TITLE = re.compile(rb"<title[^>]*>([^<]*)</title", re.IGNORECASE)
# WHATWG decodes Shift_JIS as Windows-31J (cp932: NEC and IBM extensions such as circled digits).
ENCODINGS = (("utf-8", "utf-8"), ("shift_jis", "cp932"), ("euc-jp", "euc_jp"))
# Declared charsets (HTTP header, <meta>) that are tried before the fixed order, by their usual labels.
DECLARED = {
    **dict.fromkeys(("utf-8", "utf8"), ("utf-8", "utf-8")),
    **dict.fromkeys(
        ("shift_jis", "shift-jis", "sjis", "x-sjis", "windows-31j", "cp932", "ms_kanji"),
        ("shift_jis", "cp932"),
    ),
    **dict.fromkeys(("euc-jp", "x-euc-jp", "eucjp", "euc_jp"), ("euc-jp", "euc_jp")),
    "iso-2022-jp": ("iso-2022-jp", "iso2022_jp"),
}
META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_-]+)""", re.IGNORECASE)
# EUC-JP bytes often decode as Shift_JIS too, into half-width katakana that real Shift_JIS text rarely
# has; cp932 also takes bytes no Shift_JIS text holds (0xFD-0xFF, user-defined rows) into the private
# use area. A Shift_JIS reading with either is kept only when EUC-JP does not decode.
UNLIKELY_SHIFT_JIS = re.compile(r"[\uff61-\uff9f\ue000-\uf8ff]")
KANA = re.compile(r"[\u3041-\u309f\u30a0-\u30ff\uff66-\uff9d]")
KANJI = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
HTML_TYPES = ("text/html", "application/xhtml+xml")


def decode_japanese(data: bytes, declared: str | None = None) -> tuple[str, str] | None:
    """(text, encoding): the declared charset if it is a Japanese one (or UTF-8) and decodes `data`,
    else the first of UTF-8, Shift_JIS, EUC-JP that decodes it without error; an unlikely Shift_JIS
    reading loses to a clean EUC-JP one. None when nothing decodes."""
    if declared and declared.lower() in DECLARED:
        name, codec = DECLARED[declared.lower()]
        try:
            return data.decode(codec), name
        except UnicodeDecodeError:
            pass
    fallback = None
    for name, codec in ENCODINGS:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError:
            continue
        if name == "shift_jis" and UNLIKELY_SHIFT_JIS.search(text):
            fallback = (text, name)
            continue
        return text, name
    return fallback


def declared_charset(http_charset: str | None, page: bytes) -> str | None:
    """The charset the HTTP header declares, else the one a <meta> tag in the first 4 KiB declares."""
    if http_charset:
        return http_charset
    match = META_CHARSET.search(page, 0, 4096)
    return match.group(1).decode("ascii") if match else None


def page_title(page: bytes, declared: str | None = None) -> tuple[str, str] | None:
    """(title, encoding) of the page's <title>, decoded as decode_japanese does; None without one."""
    match = TITLE.search(page)
    if match is None:
        return None
    decoded = decode_japanese(match.group(1), declared)
    if decoded is None:
        return None
    return " ".join(html.unescape(decoded[0]).split()), decoded[1]


def looks_japanese(page: bytes, title: tuple[str, str] | None) -> bool:
    """Swallow's pre-check: `<html lang="ja...">`, or a title with kana, or a kanji title in a Japanese
    legacy encoding (a kanji-only UTF-8 title may as well be Chinese)."""
    if LANG_JA.search(page):
        return True
    if title is None:
        return False
    text, encoding = title
    return bool(KANA.search(text)) or (encoding != "utf-8" and bool(KANJI.search(text)))


def _resiliparse() -> Callable[[str], str]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree

    def extract(page: str) -> str:
        tree = HTMLTree.parse(page)
        return extract_plain_text(
            tree, preserve_formatting=True, main_content=True, alt_texts=False, links=False, comments=False
        )

    return extract


def _trafilatura() -> Callable[[str], str]:
    try:
        import trafilatura
    except ImportError as exc:
        raise UserError(
            f"the trafilatura extractor is not installed ({exc}); run `pip install -e '.[trafilatura]'` in the kumihimo checkout "
            "or set input.warc.extractor=resiliparse"
        ) from exc

    def extract(page: str) -> str:
        return trafilatura.extract(page, include_comments=False, include_tables=False) or ""

    return extract


def main_text_extractor(name: str) -> Callable[[str], str]:
    """The function that turns a decoded HTML page into its main text, by extractor name."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown WARC extractor {name!r}; use one of {', '.join(EXTRACTORS)}")
    return _resiliparse() if name == "resiliparse" else _trafilatura()


def _http_head(block: bytes) -> tuple[int, str, str | None, bytes]:
    """(status, content type without parameters, charset or None, payload) of an HTTP response block."""
    head, _, payload = block.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_parts = lines[0].split(None, 2)
    status = int(status_parts[1]) if len(status_parts) > 1 and status_parts[1].isdigit() else 0
    content_type, charset = "", None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            kind, *params = value.decode("latin-1").split(";")
            content_type = kind.strip().lower()
            for param in params:
                key, _, param_value = param.partition("=")
                if key.strip().lower() == "charset":
                    charset = param_value.strip().strip("\"'") or None
    return status, content_type, charset, payload


def _page(
    offset: int, headers: Any, block: bytes, extract: Callable[[str], str], precheck: bool
) -> Record | BadRecord | Skipped:
    record_id = headers.get("WARC-Record-ID") or ""
    url = headers.get("WARC-Target-URI") or ""
    length = headers.get("Content-Length")
    if length is None or not length.isdigit() or len(block) != int(length):
        expected = f"the {length} declared" if length else "an undeclared number of"
        detail = f"record at byte offset {offset} is cut short: {len(block)} bytes of {expected}"
        return BadRecord(offset, "truncated_record", detail, url)
    status, content_type, http_charset, payload = _http_head(block)
    if status != 200:
        return Skipped(offset, record_id, "warc", "http_status", f"HTTP {status}", url)
    if content_type and content_type not in HTML_TYPES:
        return Skipped(offset, record_id, "warc", "not_html", content_type, url)
    declared = declared_charset(http_charset, payload)
    title = page_title(payload, declared)
    if precheck and not looks_japanese(payload, title):
        return Skipped(offset, record_id, "warc", "not_japanese", "no lang=ja, no Japanese title", url)
    decoded = decode_japanese(payload, declared)
    if decoded is None:
        detail = f"record at byte offset {offset} is not UTF-8, Shift_JIS or EUC-JP"
        return BadRecord(offset, "undecodable_page", detail, payload[:EXCERPT_CHARS].decode("latin-1"))
    try:
        text = extract(decoded[0])
    except Exception as exc:  # an extractor bug on one odd page must not stop a file of 40,000
        detail = f"record at byte offset {offset}: {type(exc).__name__}: {exc}"
        return BadRecord(offset, "extraction_failed", detail, url)
    # one line per paragraph, as in the JSONL corpora (resiliparse separates paragraphs by blank lines
    # and keeps the tabs and spaces that indented the HTML source)
    text = "\n".join(stripped for line in text.splitlines() if (stripped := line.strip()))
    if not text:
        return Skipped(offset, record_id, "extract", "no_main_text", "the extractor found no main text", url)
    fields = {
        "text": text,
        "id": record_id,
        "url": url,
        "title": title[0] if title else "",
        "date": headers.get("WARC-Date") or "",
        "encoding": decoded[1],
    }
    return Record(offset, fields, url)


def iter_warc(
    path: str, *, extractor: str = "resiliparse", japanese_precheck: bool = True
) -> Iterator[Record | BadRecord | Skipped]:
    """Every response record of a WARC file (.warc or .warc.gz) as a Record (an extracted page with
    text, id, url, title, date, encoding), a Skipped or a BadRecord; other record types give nothing."""
    extract = main_text_extractor(extractor)
    offset = 0
    try:
        records = ArchiveIterator(str(path), record_types=WarcRecordType.response, parse_http=False)
        for warc_record in records:
            offset = warc_record.stream_pos
            block = warc_record.reader.read()
            yield _page(offset, warc_record.headers, block, extract, japanese_precheck)
    except OSError as exc:
        detail = f"unreadable after byte offset {offset}: {type(exc).__name__}: {exc}"
        yield BadRecord(offset, "corrupt_file", detail, "")


def warc_response(
    url: str,
    payload: bytes,
    *,
    date: str = "2024-01-01T00:00:00Z",
    status: int = 200,
    content_type: str = "text/html",
) -> bytes:
    """One uncompressed WARC/1.0 response record holding an HTTP response with `payload` (tests, samples)."""
    reason = "OK" if status == 200 else "Other"
    http = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode("latin-1") + payload
    record_id = uuid.uuid5(uuid.NAMESPACE_URL, url)  # stable ids: a regenerated sample is byte-identical
    head = (
        f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:{record_id}>\r\nWARC-Date: {date}\r\n"
        f"WARC-Target-URI: {url}\r\nContent-Type: application/http; msgtype=response\r\n"
        f"WARC-Identified-Payload-Type: {content_type}\r\n"
        f"Content-Length: {len(http)}\r\n\r\n"
    ).encode()
    return head + http + b"\r\n\r\n"


def write_warc(path: str | os.PathLike, records: list[bytes]) -> None:
    """Write records as a .warc.gz (one gzip member per record, as Common Crawl does), atomically."""
    write_bytes_atomic(path, b"".join(gzip.compress(record, mtime=0) for record in records))

"""One entry for reading every record file the stages take in: JSONL (plain, .gz, .zst), Parquet, WARC,
plain text. It owns the suffix -> format table and picks the reader; each format has its own reader
module (kumihimo.core.jsonl_rows for JSONL and text, parquet_rows, warc), all giving the record types of
kumihimo.core.record_types, and none of them imports this module.

data_prep, tokenizer training and evaluation, and the decontamination index all read through here, so
a format works everywhere or nowhere and an unsupported file gets the same one-line error everywhere.

Two ways to read:
- `iter_records(path)` is lenient: every record comes back as a `Record` (its position, the record as a
  dict, a raw excerpt) or a `BadRecord` (position, reason, detail, excerpt), and reading goes on. WARC
  also gives `Skipped` for pages its own checks leave out (not Japanese, not HTML, no main text).
  data_prep turns these into documents and quarantine events.
- `read_records(path)` is strict, for inputs that must be clean (tokenizer samples, evaluation sets):
  the first bad record raises a UserError naming the file, the position and the reason.

Positions are 1-based line numbers (JSONL, text), 1-based row numbers in the file (Parquet) and byte
offsets of the record in the file (WARC; compressed offsets for .warc.gz, where a reader can seek).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kumihimo.core.errors import UserError
from kumihimo.core.jsonl_rows import iter_jsonl, iter_text
from kumihimo.core.record_types import BadRecord, Record, Skipped

# Suffix -> format. Compressed JSONL and text are decompressed on the fly; WARC decompresses itself.
FORMATS = {
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".jsonl.zstd": "jsonl",
    ".json": "jsonl",  # one JSON object per line, as many evaluation sets ship
    ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".warc.gz": "warc",
    ".warc": "warc",
    ".txt": "text",
    ".txt.gz": "text",
    ".txt.zst": "text",
}
RECORD_FORMATS = ("jsonl", "parquet", "warc")
# BadRecord reasons as read_records words them after "<file>:<position>".
PROBLEMS = {
    "corrupt_file": "is unreadable",
    "invalid_utf8": "is not UTF-8",
    "malformed_json": "is not valid JSON",
    "not_an_object": "is not a JSON object",
    "truncated_record": "is a truncated WARC record",
    "undecodable_page": "is a page in no Japanese encoding",
    "extraction_failed": "is a page the extractor failed on",
}


def file_format(path: str, accepted: tuple[str, ...] = RECORD_FORMATS) -> str:
    """The format of `path` from its suffix, or a UserError naming the suffixes that `accepted` allows."""
    name = str(path).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix) and FORMATS[suffix] in accepted:
            return FORMATS[suffix]
    allowed = ", ".join(s for s, f in FORMATS.items() if f in accepted)
    raise UserError(f"{path}: unsupported file type; use one of {allowed} (rename or convert the file)")


def iter_records(
    path: str,
    *,
    columns: list[str] | None = None,
    accepted: tuple[str, ...] = RECORD_FORMATS,
    warc_extractor: str = "resiliparse",
    warc_japanese_precheck: bool = True,
) -> Iterator[Record | BadRecord | Skipped]:
    """Every record of a whole file, leniently. `columns` limits what Parquet reads (None: all);
    text files give one record per non-blank line as {"text": line}."""
    kind = file_format(path, accepted)
    if kind == "jsonl":
        yield from iter_jsonl(path)
    elif kind == "parquet":
        from kumihimo.core.parquet_rows import iter_parquet  # pyarrow is loaded only when needed

        yield from iter_parquet(path, columns=columns)
    elif kind == "warc":
        from kumihimo.core.warc import iter_warc  # fastwarc and the extractor are loaded only when needed

        yield from iter_warc(path, extractor=warc_extractor, japanese_precheck=warc_japanese_precheck)
    else:
        yield from iter_text(path)


def read_records(path: str, **options: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, record) of every record, strictly: a bad record raises a UserError. Options are
    those of iter_records; WARC pages that its checks leave out are passed over."""
    for item in iter_records(path, **options):
        if isinstance(item, BadRecord):
            problem = PROBLEMS.get(item.reason, item.reason.replace("_", " "))
            raise UserError(f"{path}:{item.position} {problem} ({item.detail}); fix or remove that record")
        if isinstance(item, Record):
            yield item.position, item.fields

"""WARC in data_prep: one WARC file is one shard; its response records become documents
(data_prep/documents.py), BadLines (truncated records, undecodable pages) or Dropped records (pages the
reader's own checks leave out: not Japanese, not HTML, no main text). The pages are read and extracted by
kumihimo.core.warc.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from kumihimo.core.record_types import BadRecord, Skipped
from kumihimo.core.warc import iter_warc
from kumihimo.data_prep.config import InputConfig
from kumihimo.data_prep.documents import BadLine, Document, Dropped, Shard


def read_warc_shard(shard: Shard, fields: InputConfig) -> Iterator[Document | BadLine | Dropped]:
    """A WARC file's pages; `line` is the record's byte offset in the file (where `dd skip=` finds it)."""
    options = fields.warc
    for item in iter_warc(
        shard.path, extractor=options.extractor, japanese_precheck=options.japanese_precheck
    ):
        if isinstance(item, BadRecord):
            yield BadLine(shard.source, shard.path, item.position, item.reason, item.detail, item.excerpt)
        elif isinstance(item, Skipped):
            yield Dropped(
                shard.source,
                shard.path,
                item.position,
                item.record_id,
                item.stage,
                item.reason,
                item.detail,
                item.excerpt,
            )
        else:
            page = item.fields
            doc_id = page["id"] or f"{shard.source}:{os.path.basename(shard.path)}:{item.position}"
            meta = {"title": page["title"], "date": page["date"]}
            yield Document(
                shard.source, shard.path, item.position, doc_id, page["text"], page["url"] or None, meta
            )

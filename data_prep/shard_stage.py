"""Per-shard curation: read -> repair -> langid -> quality -> decontam -> PII -> dedup keys.

One call handles one shard and leaves one directory `work/shards/<id>/` with the surviving candidates,
the drops, the quarantined lines, the dedup stages' sorted runs of exact keys and LSH band keys
(dedup_stages.write_shard_runs), and stats. The directory is
built under a temporary name and renamed when complete, so its existence is the done-marker.
Documents go through the stages in batches of DOC_BATCH; what was decided for each is recorded in
input order, so the outputs and stats are those of curating one document at a time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import batched
from pathlib import Path
from typing import Any

import numpy as np

from kumihimo.core.files import TEMP_MARK
from kumihimo.data_prep.cleanup import normalize_punctuation, trim_footer
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.decontam import Decontaminator, load_eval_index
from kumihimo.data_prep.dedup_stages import write_shard_runs
from kumihimo.data_prep.documents import BadLine, Document, Dropped, Shard
from kumihimo.data_prep.jsonl_io import AtomicJsonlWriter
from kumihimo.data_prep.langid import identify_batch
from kumihimo.data_prep.minhash import MinHasher, exact_key
from kumihimo.data_prep.pii import PiiRedactor
from kumihimo.data_prep.quality import QualityFilter
from kumihimo.data_prep.repair import repair_text
from kumihimo.data_prep.scoring import load_scorers, score_texts, score_verdict
from kumihimo.data_prep.shards import read_shard

SIGNATURE_BATCH = 256
DOC_BATCH = 256  # documents curated together (language ID and decontamination vectorise across them)
CANDIDATES = "candidates.jsonl"
DROPPED = "dropped.jsonl"
QUARANTINE = "quarantine.jsonl"
IDS = "ids.txt"
STATS = "stats.json"


@dataclass
class StageTools:
    """What a worker builds once and reuses for every shard (compiled lists, loaded indexes)."""

    config: DataPrepConfig
    quality: QualityFilter
    redactor: PiiRedactor
    decontaminator: Decontaminator
    minhasher: MinHasher | None
    scorers: list[tuple[str, Any]]  # (attribute name, loaded model) of score.scorers


def build_tools(config: DataPrepConfig, eval_index_path: Path) -> StageTools:
    minhasher = MinHasher(config.dedup) if config.dedup.fuzzy else None
    decontaminator = Decontaminator(load_eval_index(eval_index_path), config.decontam)
    return StageTools(
        config,
        QualityFilter(config.filters),
        PiiRedactor(config.pii),
        decontaminator,
        minhasher,
        load_scorers(config.score),
    )


class ShardStats:
    """Counts and a few examples for one shard; merged across shards by the report."""

    def __init__(self, examples_per_reason: int, excerpt_chars: int):
        self.num_input = 0
        self.num_candidates = 0
        self.num_repaired = 0
        self.num_boilerplate_lines_removed = 0
        self.cleanup: Counter[str] = Counter()
        self.quarantined: Counter[str] = Counter()
        self.dropped: dict[str, Counter[str]] = defaultdict(Counter)
        self.dropped_languages: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._k = examples_per_reason
        self._excerpt = excerpt_chars

    def example(self, key: str, record: dict[str, Any]) -> None:
        if len(self.examples[key]) < self._k:
            self.examples[key].append(record)

    def to_json(self) -> dict[str, Any]:
        return {
            "num_input": self.num_input,
            "num_candidates": self.num_candidates,
            "num_repaired": self.num_repaired,
            "num_boilerplate_lines_removed": self.num_boilerplate_lines_removed,
            "cleanup": dict(self.cleanup),
            "quarantined": dict(self.quarantined),
            "dropped": {stage: dict(c) for stage, c in self.dropped.items()},
            "dropped_languages": dict(self.dropped_languages),
            "examples": dict(self.examples),
        }


def _drop_record(doc: Document, drop: Drop, excerpt_chars: int) -> dict[str, Any]:
    """The line of dropped/<source>.jsonl for `doc`."""
    return {
        "id": doc.doc_id,
        "source": doc.source,
        "file": doc.path,
        "line": doc.line,
        "stage": drop.stage,
        "reason": drop.reason,
        "detail": drop.detail,
        "lang": drop.lang,
        "excerpt": drop.text[:excerpt_chars],
    }


@dataclass(frozen=True)
class Drop:
    """Why curation dropped one document: the stage and reason that decided it (the report's keys), the
    detail shown to people, the text it had at that point (for the excerpt) and its language (None
    before language ID)."""

    stage: str
    reason: str
    detail: str
    text: str
    lang: str | None


@dataclass(frozen=True)
class Cleanup:
    """What Swallow's clean-up changed in one kept Japanese document (for the report's counts and
    examples)."""

    punctuation_normalized: bool
    num_footer_lines: int
    before: str
    after: str


@dataclass
class _Outcome:
    """What curation decided for one document; recorded in input order by process_shard."""

    repaired: bool = False
    num_boilerplate_removed: int = 0
    candidate: dict[str, Any] | None = None
    drop: Drop | None = None
    metrics: dict[str, Any] | None = None  # the quality measurements (stored as the record's attributes)
    cleanup: Cleanup | None = None


def _curate_batch(docs: list[Document], tools: StageTools) -> list[_Outcome]:
    """One outcome per document. Each stage runs on what the previous ones kept; language ID and
    decontamination take the whole batch at once (their numpy work is vectorised across documents)."""
    config = tools.config
    outcomes = [_Outcome() for _ in docs]
    repaired: list[tuple[_Outcome, Document, str]] = []
    for doc, outcome in zip(docs, outcomes):
        text, reason, outcome.repaired = repair_text(doc.text, config.repair)
        if reason:
            detail = (
                "text is still garbled after repair"
                if reason != "empty_after_cleanup"
                else "nothing left after removing control characters and spaces"
            )
            outcome.drop = Drop("repair", reason, detail, text, None)
        else:
            repaired.append((outcome, doc, text))
    labels = identify_batch([text for _, _, text in repaired], config.langid)
    passed: list[tuple[_Outcome, Document, str, str]] = []
    for (outcome, doc, text), (lang, confidence) in zip(repaired, labels):
        text = _language_and_quality(outcome, doc, text, lang, confidence, tools)
        if text is not None:
            passed.append((outcome, doc, text, lang))
    if config.cleanup.enabled:
        passed = [
            (outcome, doc, _clean_up(outcome, text, lang, config), lang)
            for outcome, doc, text, lang in passed
        ]
    overlaps = tools.decontaminator.check_batch([text for _, _, text, _ in passed])
    for (outcome, doc, text, lang), overlap in zip(passed, overlaps):
        if overlap:
            outcome.drop = Drop("decontam", "eval_overlap", overlap, text, lang)
            continue
        text, pii_counts = tools.redactor.redact(text)
        meta: dict[str, Any] = {"file": doc.path, "line": doc.line}
        if doc.url is not None:
            meta["url"] = doc.url
        if pii_counts:
            meta["pii"] = dict(pii_counts)
        meta.update(doc.meta)
        outcome.candidate = {"id": doc.doc_id, "text": text, "lang": lang, "source": doc.source, "meta": meta}
        if outcome.metrics is not None:
            outcome.candidate["attributes"] = outcome.metrics
    if tools.scorers:  # the models see the final text (cleaned up, redacted), a batch at a time
        kept = [outcome.candidate for outcome in outcomes if outcome.candidate is not None]
        for candidate, scores in zip(kept, score_texts(tools.scorers, [c["text"] for c in kept])):
            candidate["attributes"] = {**candidate.get("attributes", {}), **scores}
        if not config.filters.refilterable:  # refilterable runs carry them; the merge decides
            for outcome in outcomes:
                _apply_min_scores(outcome, config)
    return outcomes


def _apply_min_scores(outcome: _Outcome, config: DataPrepConfig) -> None:
    """Turn a kept document scoring below a scorer's min_score into a quality drop (with its scores)."""
    candidate = outcome.candidate
    if candidate is None:
        return
    verdict = score_verdict(config.score, candidate["attributes"])
    if verdict:
        outcome.drop = Drop("quality", *verdict, candidate["text"], candidate["lang"])
        outcome.metrics, outcome.candidate = candidate["attributes"], None


def _clean_up(outcome: _Outcome, text: str, lang: str, config: DataPrepConfig) -> str:
    """Swallow's clean-up of a filtered Japanese document; what changed is kept in `outcome`."""
    cleanup = config.cleanup
    if lang != "ja":
        return text
    before = text
    punctuation = False
    num_footer_lines = 0
    if cleanup.normalize_punctuation:
        text, commas, stops = normalize_punctuation(text)
        punctuation = commas or stops
    if cleanup.trim_footer:
        text, num_footer_lines = trim_footer(
            text, cleanup.footer_keywords, cleanup.footer_lines, cleanup.footer_keyword_share
        )
    if text != before:
        outcome.cleanup = Cleanup(punctuation, num_footer_lines, before, text)
    return text


def _language_and_quality(
    outcome: _Outcome, doc: Document, text: str, lang: str, confidence: float, tools: StageTools
) -> str | None:
    """The language and quality verdicts for one document: its text after boilerplate removal if it
    passes, else None (and the drop is in `outcome`)."""
    config = tools.config
    if lang not in config.langid.keep:
        outcome.drop = Drop("langid", "language_not_kept", f"{lang} ({confidence:.2f})", text, lang)
        return None
    if confidence < config.langid.min_confidence:
        outcome.drop = Drop(
            "langid",
            "low_confidence",
            f"{lang} ({confidence:.2f}) < {config.langid.min_confidence}",
            text,
            lang,
        )
        return None
    measured = tools.quality.measure(text, lang, doc.url)
    outcome.num_boilerplate_removed = measured.num_removed
    outcome.metrics = measured.metrics or None
    verdict = measured.verdict
    if verdict is None and not config.filters.refilterable:
        # refilterable runs carry documents that thresholded rules drop on; the merge decides them
        verdict = tools.quality.decide(measured.metrics, lang)
    if verdict:
        outcome.drop = Drop("quality", verdict[0], verdict[1], measured.text, lang)
        return None
    return measured.text


def _record_drop(doc: Document, outcome: _Outcome, stats: ShardStats, excerpt_chars: int) -> dict[str, Any]:
    drop = outcome.drop
    assert drop is not None, "a document with neither a candidate nor a drop"
    if drop.reason == "language_not_kept":
        stats.dropped_languages[drop.lang] += 1
    stats.dropped[drop.stage][drop.reason] += 1
    record = _drop_record(doc, drop, excerpt_chars)
    if outcome.metrics is not None:
        record["attributes"] = outcome.metrics
    stats.example(f"{drop.stage}/{drop.reason}", record)
    return record


def _count_cleanup(change: Cleanup, doc: Document, stats: ShardStats) -> None:
    num_footer_lines, before, after = change.num_footer_lines, change.before, change.after
    stats.cleanup["num_documents"] += 1
    stats.cleanup["num_punctuation_normalized"] += change.punctuation_normalized
    stats.cleanup["num_footers_trimmed"] += num_footer_lines > 0
    stats.cleanup["num_footer_lines_removed"] += num_footer_lines
    kind = "footer" if num_footer_lines else "punctuation"
    where = {"id": doc.doc_id, "file": doc.path, "line": doc.line}
    if num_footer_lines:  # the end of the text shows what was cut
        lines = before.split("\n")
        excerpt = "\n".join(lines[-num_footer_lines:])[: stats._excerpt]
        stats.example(
            f"cleanup/{kind}", {**where, "detail": f"cut {num_footer_lines} lines", "excerpt": excerpt}
        )
    else:
        changed = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), 0)
        start = max(0, changed - stats._excerpt // 4)
        stats.example(
            f"cleanup/{kind}",
            {
                **where,
                "detail": "，． -> 、。",
                "excerpt": before[start : start + stats._excerpt // 2],
                "after": after[start : start + stats._excerpt // 2],
            },
        )


def process_shard(shard: Shard, tools: StageTools, shards_dir: Path) -> None:
    """Curate one shard into `shards_dir/<shard_id>/` (renamed into place when complete)."""
    config = tools.config
    final = shards_dir / shard.shard_id
    tmp = shards_dir / f".{shard.shard_id}{TEMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    stats = ShardStats(config.report.examples_per_reason, config.report.excerpt_chars)
    exact_keys: list[int] = []
    signatures: list[np.ndarray] = []
    pending: list[str] = []

    def flush_signatures() -> None:
        if pending and tools.minhasher is not None:
            signatures.append(tools.minhasher.signatures(pending))
        pending.clear()

    with (
        AtomicJsonlWriter(tmp / CANDIDATES) as candidates,
        AtomicJsonlWriter(tmp / DROPPED) as dropped,
        AtomicJsonlWriter(tmp / QUARANTINE) as quarantine,
        open(tmp / IDS, "w", encoding="utf-8") as ids,
    ):
        for batch in batched(read_shard(shard, config.input), DOC_BATCH):
            outcomes = iter(_curate_batch([item for item in batch if isinstance(item, Document)], tools))
            for item in batch:
                if isinstance(item, BadLine):
                    stats.quarantined[item.reason] += 1
                    record = {
                        "source": item.source,
                        "file": item.path,
                        "line": item.line,
                        "reason": item.reason,
                        "detail": item.detail,
                        "raw": item.raw[: config.report.excerpt_chars],
                    }
                    quarantine.write(record)
                    stats.example(f"read/{item.reason}", record)
                    continue
                stats.num_input += 1
                if isinstance(item, Dropped):  # left out by the reader (WARC: not Japanese, no main text)
                    stats.dropped[item.stage][item.reason] += 1
                    record = {
                        "id": item.doc_id,
                        "source": item.source,
                        "file": item.path,
                        "line": item.line,
                        "stage": item.stage,
                        "reason": item.reason,
                        "detail": item.detail,
                        "lang": None,
                        "excerpt": item.excerpt[: config.report.excerpt_chars],
                    }
                    dropped.write(record)
                    stats.example(f"{item.stage}/{item.reason}", record)
                    continue
                outcome = next(outcomes)
                stats.num_repaired += outcome.repaired
                stats.num_boilerplate_lines_removed += outcome.num_boilerplate_removed
                if outcome.cleanup is not None:
                    _count_cleanup(outcome.cleanup, item, stats)
                if outcome.candidate is None:
                    dropped.write(_record_drop(item, outcome, stats, config.report.excerpt_chars))
                    continue
                candidate = outcome.candidate
                stats.num_candidates += 1
                candidates.write(candidate)
                ids.write(json.dumps(candidate["id"], ensure_ascii=False) + "\n")
                exact_keys.append(exact_key(candidate["text"]))
                pending.append(candidate["text"])
                if len(pending) >= SIGNATURE_BATCH:
                    flush_signatures()
        flush_signatures()
    all_signatures = None
    if tools.minhasher is not None:
        num_perm = tools.minhasher.num_perm
        all_signatures = (
            np.concatenate(signatures) if signatures else np.empty((0, num_perm), dtype=np.uint32)
        )
    write_shard_runs(tmp, np.array(exact_keys, dtype=np.uint64), all_signatures, config.dedup)
    (tmp / STATS).write_text(json.dumps(stats.to_json(), ensure_ascii=False), encoding="utf-8")
    os.rename(tmp, final)

"""Quality thresholds applied after the fact: `kumihimo data refilter`.

A run curated with filters.refilterable=true carries every document that reached the quality stage
through clean-up, decontamination, PII and hashing into work/shards/, each with its quality measurements
(the record's "attributes"). Which of them pass is decided in the dedup stages (dedup_stages.alive_step), from those
measurements and the config's thresholds; the merge writes the others as quality drops. Refilter
therefore only checks that nothing but thresholds changed, rewrites the run's manifest, and runs the
dedup and merge phases again: no extraction, repair, language ID or hashing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.data_prep.config import DataPrepConfig, ScoreConfig
from kumihimo.data_prep.layout import CURATION_SECTIONS, RunLayout
from kumihimo.data_prep.quality import QualityFilter
from kumihimo.data_prep.scoring import score_verdict


def quality_passes(config: DataPrepConfig, candidate_files: list[Path]) -> np.ndarray:
    """For every candidate row of the shards (in order), whether it passes the thresholded rules."""
    qf = QualityFilter(config.filters)
    passes: list[bool] = []
    for path in candidate_files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                passes.append(_verdict(qf, record, config.score) is None)
    return np.array(passes, dtype=bool)


def _verdict(qf: QualityFilter, record: dict[str, Any], score: ScoreConfig):
    attributes = record.get("attributes") or {}
    try:
        return qf.decide(attributes, record["lang"]) or score_verdict(score, attributes)
    except KeyError as missing:
        raise UserError(
            f"document {record['id']!r} has no stored measurement {missing}: the run was curated without the "
            "rule that needs it; curate again (a new output_dir) to apply it"
        ) from None


def quality_drop(
    qf: QualityFilter, record: dict[str, Any], excerpt_chars: int, score: ScoreConfig
) -> dict[str, Any]:
    """The drop record of a carried document that the thresholds drop (as the shard stage writes it)."""
    reason, detail = _verdict(qf, record, score)
    return {
        "id": record["id"],
        "source": record["source"],
        "file": record["meta"]["file"],
        "line": record["meta"]["line"],
        "stage": "quality",
        "reason": reason,
        "detail": detail,
        "lang": record["lang"],
        "excerpt": record["text"][:excerpt_chars],
        "attributes": record.get("attributes"),
    }


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: tree}


def _is_threshold(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_threshold(v) for v in value)
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _scorers(config: DataPrepConfig) -> dict[str, Any]:
    """score.scorers keyed by name (score.scorers.<name>.<field>): the stored scores come from the models
    the run was curated with, so only a min_score may change."""
    return {"score": {"scorers": {s.name: configtree.to_dict(s) for s in config.score.scorers}}}


def changes_refilter_cannot_apply(old: DataPrepConfig, new: DataPrepConfig) -> list[str]:
    """Dotted keys whose change needs a new curation (anything but a threshold, or turning a rule off)."""
    before = _leaves({**{s: configtree.to_dict(getattr(old, s)) for s in CURATION_SECTIONS}, **_scorers(old)})
    after = _leaves({**{s: configtree.to_dict(getattr(new, s)) for s in CURATION_SECTIONS}, **_scorers(new)})
    blocked = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if key.startswith("filters.") and _is_threshold(a) and _is_threshold(b):
            continue
        if key.startswith("score.") and key.endswith(".min_score") and _is_threshold(a) and _is_threshold(b):
            continue
        if key in ("filters.ja.enabled", "filters.en.enabled") and b is False:
            continue
        blocked.append(f"{key}: {a!r} -> {b!r}")
    return blocked


def prepare_refilter(config: DataPrepConfig) -> None:
    """Check that `config` may refilter the run in its output_dir and forget that run's dedup and merge."""
    layout = RunLayout(Path(config.output_dir))
    saved = layout.out / "data_prep_config.yaml"
    if not saved.is_file() or not layout.shards.is_dir():
        raise UserError(
            f"output_dir={config.output_dir!r} holds no curated run; run `kumihimo data curate` first"
        )
    old = configtree.load(DataPrepConfig, saved)
    if not old.filters.refilterable:
        raise UserError(
            f"the run in output_dir={config.output_dir!r} was curated with filters.refilterable=false, so the "
            "documents its rules dropped were not kept; curate again with filters.refilterable=true"
        )
    if not config.filters.refilterable:
        raise UserError(
            "filters.refilterable=false: refilter needs it true (the run it refilters was curated so)"
        )
    blocked = changes_refilter_cannot_apply(old, config)
    if blocked:
        raise UserError(
            "refilter can change thresholds only; these need a new curation: " + "; ".join(blocked)
        )
    shutil.rmtree(layout.dedup_folder, ignore_errors=True)  # written by dedup_stages, redone with new passes
    shutil.rmtree(layout.work / "merged", ignore_errors=True)
    (layout.work / "run.json").unlink()
    configtree.write_text_atomic(layout.out / "refiltered_from.yaml", saved.read_text(encoding="utf-8"))

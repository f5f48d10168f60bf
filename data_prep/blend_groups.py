"""Blend groups: one Megatron prefix per (source, score bucket, rehydration weight class).

`tokenize.buckets` splits a source by a stored model score (attributes.score_<name>) at fixed edges,
and `tokenize.rehydration` by the duplicate cluster size the curation recorded (attributes.cluster_size).
Every document of a source falls in exactly one group; each group is its own prefix, and its blend
weight is its tokens x the source's weight_multiplier x the bucket's multiplier x the rehydration
weight (normalised over all prefixes). Groups whose multiplier is 0 are not written. Without either
option a source is one group named as before (`<source>_text_document`), so nothing changes.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from kumihimo.core.errors import UserError
from kumihimo.data_prep.config import DataPrepConfig, ScoreBucketsConfig, prefix_number

DROPPED = -1  # group of a document in a group with multiplier 0


@dataclass(frozen=True)
class Group:
    name: str  # the prefix stem: <source>[_<score>_ge<edge>|_lt<edge>][_rh<weight>]
    bucket: str | None  # e.g. "3 <= edu < 3.5", None without buckets
    rehydration_weight: float | None  # None without rehydration
    multiplier: float  # bucket multiplier x rehydration weight


@dataclass(frozen=True)
class SourceGrouping:
    """How one source's documents map to groups; picklable, so workers can apply it to their batches."""

    source: str
    score_attribute: str | None
    edges: tuple[float, ...]
    rehydration_sizes: tuple[int, ...]  # min_size of each table row
    rehydration_class: tuple[int, ...]  # weight class of each table row
    num_classes: int
    groups: tuple[Group, ...]  # bucket-major: index = bucket x num_classes + class
    kept: tuple[int, ...]  # group index, or DROPPED when its multiplier is 0

    @property
    def trivial(self) -> bool:
        return self.score_attribute is None and not self.rehydration_sizes

    def group_of(self, record: dict[str, Any]) -> int:
        """The group index of a curated record, or DROPPED."""
        attributes = record.get("attributes") or {}
        bucket = 0
        if self.score_attribute is not None:
            value = attributes.get(self.score_attribute)
            if not isinstance(value, (int, float)) or math.isnan(value):  # NaN would sort into the top bucket
                raise UserError(
                    f"document {record.get('id')!r} of source {self.source!r} has no {self.score_attribute} "
                    f"(it is {value!r}): tokenize.buckets needs a number; curate with score.scorers holding "
                    f"{self.score_attribute.removeprefix('score_')!r} (or remove the buckets of {self.source})"
                )
            bucket = bisect.bisect_right(self.edges, value)  # value == edge goes to the bucket above
        weight_class = 0
        if self.rehydration_sizes:
            size = attributes.get("cluster_size")
            if not isinstance(size, int) or size < 1:
                raise UserError(
                    f"document {record.get('id')!r} of source {self.source!r} has no cluster_size: "
                    "tokenize.rehydration needs it; curate with dedup.record_cluster_size=true "
                    "(a new output_dir) or set tokenize.rehydration.enabled=false"
                )
            weight_class = self.rehydration_class[bisect.bisect_right(self.rehydration_sizes, size) - 1]
        return self.kept[bucket * self.num_classes + weight_class]


def _buckets(source: str, spec: ScoreBucketsConfig | None) -> list[tuple[str, str | None, float]]:
    """(name suffix, label, multiplier) per bucket, the low bucket first."""
    if spec is None:
        return [("", None, 1.0)]
    score, edges = spec.score, [prefix_number(e) for e in spec.edges]
    rows = [(f"_{score}_lt{edges[0]}", f"{score} < {edges[0]}", spec.multipliers[0])]
    for i, (edge, multiplier) in enumerate(zip(edges, spec.multipliers[1:])):
        label = f"{edge} <= {score} < {edges[i + 1]}" if i + 1 < len(edges) else f"{score} >= {edge}"
        rows.append((f"_{score}_ge{edge}", label, multiplier))
    return rows


def source_grouping(config: DataPrepConfig, source: str) -> SourceGrouping:
    spec = next((b for b in config.tokenize.buckets if b.source == source), None)
    rehydration = config.tokenize.rehydration
    if rehydration.enabled:
        weights = sorted({row.weight for row in rehydration.table})
        classes = [(f"_rh{prefix_number(w)}", w) for w in weights]
        row_class = tuple(weights.index(row.weight) for row in rehydration.table)
        sizes = tuple(row.min_size for row in rehydration.table)
    else:
        classes, row_class, sizes = [("", None)], (), ()
    groups, kept = [], []
    for suffix, label, multiplier in _buckets(source, spec):
        for rh_suffix, weight in classes:
            total = multiplier * (1.0 if weight is None else weight)
            kept.append(len(groups) if total > 0 else DROPPED)
            groups.append(Group(f"{source}{suffix}{rh_suffix}", label, weight, total))
    return SourceGrouping(
        source=source,
        score_attribute=None if spec is None else f"score_{spec.score}",
        edges=tuple(spec.edges) if spec else (),
        rehydration_sizes=sizes,
        rehydration_class=row_class,
        num_classes=len(classes),
        groups=tuple(groups),
        kept=tuple(kept),
    )


def settings(grouping: SourceGrouping) -> dict[str, Any] | None:
    """What decides the groups (for the tokenize marker); None for a source that is one group."""
    if grouping.trivial:
        return None
    return {
        "score_attribute": grouping.score_attribute,
        "edges": list(grouping.edges),
        "rehydration_sizes": list(grouping.rehydration_sizes),
        "rehydration_class": list(grouping.rehydration_class),
        "groups": [[g.name, g.multiplier] for g in grouping.groups],
    }

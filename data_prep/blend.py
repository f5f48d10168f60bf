"""blend.yaml: the dataset prefixes and weights the trainer reads (`data.blend_file`).

Prefixes are stored relative to the blend file's directory so an output directory can be moved or
copied to a cluster as a whole; `read_blend` turns them back into absolute prefixes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kumihimo.core.configtree import write_text_atomic
from kumihimo.core.errors import UserError

BLEND_FORMAT_VERSION = 1
_HEADER = (
    "# kumihimo data blend, written by `kumihimo data tokenize`.\n"
    "# `prefix` paths are relative to the directory of this file (Megatron prefixes: <prefix>.bin/.idx).\n"
    "# weight = token share x multiplier, normalised to sum to 1; multiplier = the source's weight_multiplier\n"
    "# (x the score bucket's multiplier x the rehydration weight, for entries that show them).\n"
)


@dataclass
class BlendEntry:
    source: str
    prefix: Path  # absolute
    num_tokens: int
    num_documents: int
    multiplier: float  # the source's weight_multiplier x the bucket multiplier x the rehydration weight
    name: str | None = None  # the group (<source>_<score>_ge3.5, ...); None: the source is one prefix
    bucket: str | None = None  # e.g. "3 <= edu < 3.5"
    rehydration_weight: float | None = None

    @property
    def key(self) -> str:
        return self.name or self.source

    def extra(self) -> dict[str, Any]:
        """What a grouped entry adds to its blend.yaml row (nothing for a plain source)."""
        extra: dict[str, Any] = {}
        if self.bucket is not None:
            extra["bucket"] = self.bucket
        if self.rehydration_weight is not None:
            extra["rehydration_weight"] = self.rehydration_weight
        if extra:
            extra["multiplier"] = self.multiplier
        return extra


def blend_weights(entries: list[BlendEntry]) -> list[float]:
    """Token share x multiplier, normalised; all zeros when there are no tokens."""
    raw = [e.num_tokens * e.multiplier for e in entries]
    total = sum(raw)
    return [r / total if total > 0 else 0.0 for r in raw]


def write_blend(path: Path, entries: list[BlendEntry], tokenizer_identity: dict[str, Any]) -> None:
    base = path.parent.resolve()
    weights = blend_weights(entries)
    datasets = [
        {
            "prefix": Path(e.prefix).resolve().relative_to(base).as_posix(),
            "weight": round(w, 10),
            "num_tokens": e.num_tokens,
            "num_documents": e.num_documents,
            "source": e.source,
            **e.extra(),
        }
        for e, w in zip(entries, weights)
        if w > 0
    ]
    body = {
        "format_version": BLEND_FORMAT_VERSION,
        "prefix_base": "blend_file_directory",
        "tokenizer": tokenizer_identity,
        "datasets": datasets,
    }
    write_text_atomic(path, _HEADER + yaml.safe_dump(body, sort_keys=False, allow_unicode=True))


def read_blend(path: str | Path) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """([(absolute prefix, weight)], tokenizer identity) from a blend.yaml."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"blend file {str(path)!r} does not exist; run `kumihimo data tokenize` first")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if data.get("format_version") != BLEND_FORMAT_VERSION or not isinstance(data.get("datasets"), list):
        raise UserError(
            f"{path} is not a kumihimo blend file (format_version {BLEND_FORMAT_VERSION}); "
            "regenerate it with `kumihimo data tokenize`"
        )
    base = path.parent.resolve()
    pairs = [(str(base / entry["prefix"]), entry["weight"]) for entry in _checked_entries(path)]
    return pairs, data.get("tokenizer", {})


def _checked_entries(path: Path) -> list[dict[str, Any]]:
    """The datasets of a blend.yaml, each a mapping with a string prefix and a finite positive weight
    (an edited file with weight 0, -1 or .nan made Megatron fail an assertion); counts, where given,
    are non-negative integers. One UserError naming the entry otherwise."""
    entries = (yaml.safe_load(path.read_text(encoding="utf-8")) or {})["datasets"]
    checked = []
    for i, entry in enumerate(entries):
        where = f"{path}: datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            raise UserError(
                f"{where} is not a mapping with a prefix; regenerate it with `kumihimo data tokenize`"
            )
        weight = entry.get("weight")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight <= 0
        ):
            raise UserError(
                f"{where} ({entry['prefix']}) has weight {weight!r}; a weight must be a positive number "
                "(drop the entry to leave a dataset out)"
            )
        for key in ("num_tokens", "num_documents"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise UserError(f"{where} ({entry['prefix']}) has {key}={value!r}; it must be a count (>= 0)")
        checked.append({**entry, "weight": float(weight)})
    return checked


def declared_counts(path: str | Path) -> dict[str, tuple[int | None, int | None]]:
    """{absolute prefix: (num_tokens, num_documents)} as blend.yaml records them (None where absent)."""
    path = Path(path)
    base = path.parent.resolve()
    return {
        str(base / e["prefix"]): (e.get("num_tokens"), e.get("num_documents")) for e in _checked_entries(path)
    }

"""report.json, report.md and report.html: where every input line went, with counts, histograms and examples."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from kumihimo.core.configtree import write_text_atomic
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.report_html import render_html, score_bars, score_bin

STAGE_ORDER = ("read", "warc", "extract", "repair", "langid", "quality", "decontam", "dedup")
# Stages only WARC input has (the Japanese pre-check, main-text extraction): no funnel row without them.
READER_STAGES = ("warc", "extract")
LENGTH_BINS = (100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)


def length_bin(num_chars: int) -> str:
    lower = 0
    for upper in LENGTH_BINS:
        if num_chars < upper:
            return f"{lower}-{upper - 1}"
        lower = upper
    return f">={LENGTH_BINS[-1]}"


def _bin_labels() -> list[str]:
    return [length_bin(b - 1) for b in LENGTH_BINS] + [length_bin(LENGTH_BINS[-1])]


class KeptStats:
    """Language mix, length histogram and PII counts of the documents that are kept."""

    def __init__(self) -> None:
        self.num_kept = 0
        self.num_chars = 0
        self.languages: Counter[str] = Counter()
        self.lengths: Counter[str] = Counter()
        self.pii: Counter[str] = Counter()
        self.scores: dict[str, dict[str, float]] = {}  # score_<name> -> count, sum, min, max
        self.score_bins: dict[str, Counter[int]] = {}  # score_<name> -> SCORE_BIN bin -> count

    def add(self, record: dict[str, Any]) -> None:
        self.num_kept += 1
        self.num_chars += len(record["text"])
        self.languages[record["lang"]] += 1
        self.lengths[length_bin(len(record["text"]))] += 1
        self.pii.update(record.get("meta", {}).get("pii", {}))
        for name, value in (record.get("attributes") or {}).items():
            if name.startswith("score_"):
                summary = self.scores.setdefault(name, {"count": 0, "sum": 0.0, "min": value, "max": value})
                summary["count"] += 1
                summary["sum"] += value
                summary["min"], summary["max"] = min(summary["min"], value), max(summary["max"], value)
                self.score_bins.setdefault(name, Counter())[score_bin(value)] += 1

    def to_json(self) -> dict[str, Any]:
        summary = {
            "num_kept": self.num_kept,
            "num_chars": self.num_chars,
            "languages": dict(self.languages),
            "lengths": dict(self.lengths),
            "pii": dict(self.pii),
        }
        if self.scores:  # only runs with score.scorers: other reports stay as they were
            summary["scores"] = {
                name: {
                    "count": s["count"],
                    "mean": s["sum"] / s["count"],
                    "min": s["min"],
                    "max": s["max"],
                    "histogram": {str(k): n for k, n in sorted(self.score_bins[name].items())},
                }
                for name, s in sorted(self.scores.items())
            }
        return summary


def _add_nested(total: dict[str, dict[str, int]], part: dict[str, dict[str, int]]) -> None:
    for stage, reasons in part.items():
        bucket = total.setdefault(stage, {})
        for reason, count in reasons.items():
            bucket[reason] = bucket.get(reason, 0) + count


def build_report(
    config: DataPrepConfig,
    shard_stats: list[dict[str, Any]],
    source_of: list[str],
    merged: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Fold per-shard stats (phase 1) and per-source merge summaries (phase 3) into one report."""
    k = config.report.examples_per_reason
    per_source: dict[str, dict[str, Any]] = {}
    dropped: dict[str, dict[str, int]] = {}
    quarantined: Counter[str] = Counter()
    dropped_languages: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    num_repaired = num_boilerplate = 0
    cleanup: Counter[str] = Counter()
    for stats, source in zip(shard_stats, source_of):
        row = per_source.setdefault(source, {"num_documents": 0, "num_quarantined": 0, "num_dropped": 0})
        row["num_documents"] += stats["num_input"]
        row["num_quarantined"] += sum(stats["quarantined"].values())
        row["num_dropped"] += sum(sum(r.values()) for r in stats["dropped"].values())
        quarantined.update(stats["quarantined"])
        _add_nested(dropped, stats["dropped"])
        dropped_languages.update(stats["dropped_languages"])
        num_repaired += stats["num_repaired"]
        num_boilerplate += stats["num_boilerplate_lines_removed"]
        cleanup.update(stats.get("cleanup", {}))
        for key, items in stats["examples"].items():
            bucket = examples.setdefault(key, [])
            bucket.extend(items[: k - len(bucket)])
    languages: Counter[str] = Counter()
    lengths: Counter[str] = Counter()
    pii: Counter[str] = Counter()
    for source, summary in merged.items():
        row = per_source.setdefault(source, {"num_documents": 0, "num_quarantined": 0, "num_dropped": 0})
        kept = summary["kept"]
        row["num_dropped"] += sum(summary["dedup_dropped"].values())
        # documents carried for refilter that the thresholds drop are decided in the merge
        row["num_dropped"] += sum(summary.get("quality_dropped", {}).values())
        _add_nested(
            dropped, {"quality": summary["quality_dropped"]} if summary.get("quality_dropped") else {}
        )
        row.update(
            {
                "num_input_lines": row["num_documents"] + row["num_quarantined"],
                "num_kept": kept["num_kept"],
                "num_chars": kept["num_chars"],
                "languages": kept["languages"],
                "pii": kept["pii"],
            }
        )
        if kept.get("scores"):
            row["scores"] = kept["scores"]
        _add_nested(dropped, {"dedup": summary["dedup_dropped"]} if summary["dedup_dropped"] else {})
        languages.update(kept["languages"])
        lengths.update(kept["lengths"])
        pii.update(kept["pii"])
        examples.update(summary["examples"])
    totals = {
        key: sum(r.get(key, 0) for r in per_source.values())
        for key in (
            "num_input_lines",
            "num_documents",
            "num_kept",
            "num_dropped",
            "num_quarantined",
            "num_chars",
        )
    }
    totals["num_repaired_mojibake"] = num_repaired
    totals["num_boilerplate_lines_removed"] = num_boilerplate
    assert (
        totals["num_input_lines"] == totals["num_kept"] + totals["num_dropped"] + totals["num_quarantined"]
    ), "every input line must end in exactly one place"
    return {
        "totals": totals,
        "quarantined": dict(quarantined),
        "dropped": {s: dropped[s] for s in STAGE_ORDER if s in dropped},
        "dropped_languages": dict(dropped_languages),
        "languages": dict(languages),
        "length_histogram": {label: lengths.get(label, 0) for label in _bin_labels()},
        "pii": dict(pii),
        "cleanup": dict(cleanup),
        "per_source": per_source,
        "examples": examples,
    }


def _bar(count: int, largest: int, width: int = 40) -> str:
    return "#" * (round(width * count / largest) if largest else 0)


def _stages(report: dict[str, Any]) -> tuple[str, ...]:
    return tuple(s for s in STAGE_ORDER if s not in READER_STAGES or s in report["dropped"])


def render_markdown(report: dict[str, Any]) -> str:
    t = report["totals"]
    out = [
        "# data_prep report",
        "",
        f"{t['num_input_lines']} input lines -> {t['num_kept']} kept, {t['num_dropped']} dropped, "
        f"{t['num_quarantined']} quarantined. Mojibake repaired in {t['num_repaired_mojibake']} documents; "
        f"{t['num_boilerplate_lines_removed']} boilerplate lines removed.",
        "",
        "## Funnel",
        "",
        "| stage | removed | remaining |",
        "|---|---:|---:|",
    ]
    remaining = t["num_input_lines"]
    for stage in _stages(report):
        removed = (
            sum(report["quarantined"].values())
            if stage == "read"
            else sum(report["dropped"].get(stage, {}).values())
        )
        remaining -= removed
        out.append(f"| {stage} | {removed} | {remaining} |")
    out += ["", "## Reasons", "", "| stage | reason | documents |", "|---|---|---:|"]
    out += [f"| read | {r} | {n} |" for r, n in sorted(report["quarantined"].items())]
    for stage, reasons in report["dropped"].items():
        out += [f"| {stage} | {r} | {n} |" for r, n in sorted(reasons.items(), key=lambda x: -x[1])]
    if report["dropped_languages"]:
        langs = ", ".join(
            f"{k} {v}" for k, v in sorted(report["dropped_languages"].items(), key=lambda x: -x[1])
        )
        out += ["", f"Languages dropped: {langs}"]
    out += [
        "",
        "## Sources",
        "",
        "| source | input lines | kept | dropped | quarantined | kept chars | languages |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in report["per_source"].items():
        langs = ", ".join(f"{k} {v}" for k, v in sorted(row.get("languages", {}).items()))
        out.append(
            f"| {name} | {row.get('num_input_lines', 0)} | {row.get('num_kept', 0)} | {row['num_dropped']} "
            f"| {row['num_quarantined']} | {row.get('num_chars', 0)} | {langs} |"
        )
    hist = report["length_histogram"]
    largest = max(hist.values(), default=0)
    out += ["", "## Kept document length (characters)", "", "```"]
    out += [f"{label:>12} {count:>8} {_bar(count, largest)}" for label, count in hist.items()]
    out += ["```", ""]
    if report.get("cleanup"):
        c = report["cleanup"]
        out += [
            "## Clean-up (Japanese documents past the filters)",
            "",
            f"- documents changed: {c.get('num_documents', 0)}",
            f"- ，． rewritten as 、。: {c.get('num_punctuation_normalized', 0)} documents",
            f"- footers cut: {c.get('num_footers_trimmed', 0)} documents, "
            f"{c.get('num_footer_lines_removed', 0)} lines",
            "",
        ]
    scored = {name: row["scores"] for name, row in report["per_source"].items() if row.get("scores")}
    if scored:
        out += [
            "## Model scores (kept documents; cut-offs are chosen from the stored attributes)",
            "",
            "| source | score | documents | mean | min | max |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for source, scores in scored.items():
            for name, s in scores.items():
                out.append(
                    f"| {source} | {name} | {s['count']} | {s['mean']:.4f} | {s['min']:.4f} | {s['max']:.4f} |"
                )
        out.append("")
        for source, scores in scored.items():
            for name, s in scores.items():
                bars = score_bars(s.get("histogram", {}))
                largest = max((n for _, n in bars), default=0)
                out += [f"{source} {name} (documents per score range):", "", "```"]
                out += [f"{label:>13} {count:>8} {_bar(count, largest)}" for label, count in bars]
                out += ["```", ""]
    out += ["## PII redacted (kept documents)", ""]
    out += [f"- {kind}: {n}" for kind, n in sorted(report["pii"].items())] or ["- none"]
    if report.get("tokens"):
        grouped = any("multiplier" in row for row in report["tokens"].values())
        out += [
            "",
            "## Tokens",
            "",
            "| source | prefix | documents | tokens | weight |" + (" multiplier |" if grouped else ""),
            "|---|---|---:|---:|---:|" + ("---:|" if grouped else ""),
        ]
        for name, row in report["tokens"].items():
            out.append(
                f"| {name} | {row['prefix']} | {row['num_documents']} | {row['num_tokens']} "
                f"| {row['weight']:.4f} |" + (f" {row.get('multiplier', 1.0):g} |" if grouped else "")
            )
    out += ["", "## Examples per reason", ""]
    for key, items in sorted(report["examples"].items()):
        out.append(f"### {key}")
        for item in items:
            where = f"{item.get('file')}:{item.get('line')}"
            text = (item.get("excerpt") or item.get("raw") or "").replace("\n", " ")[:160]
            out.append(f"- `{where}` {item.get('detail', '')}: {text}")
            if "after" in item:
                out.append(f"  after: {item['after'].replace(chr(10), ' ')[:160]}")
        out.append("")
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    write_text_atomic(out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=1))
    write_text_atomic(out_dir / "report.html", render_html(report, _stages(report)))
    path = out_dir / "report.md"
    write_text_atomic(path, render_markdown(report))
    return path


def add_tokens(out_dir: Path, tokens: dict[str, dict[str, Any]]) -> Path | None:
    """Add the per-source token counts to an existing report (after `tokenize`)."""
    json_path = out_dir / "report.json"
    if not json_path.is_file():
        return None
    report = json.loads(json_path.read_text(encoding="utf-8"))
    report["tokens"] = tokens
    return write_report(out_dir, report)

"""report.html: the curation report as one self-contained page (inline SVG bar charts, no scripts,
no network, no plotting library), for reading in a browser or attaching to a data card."""

from __future__ import annotations

import math
from html import escape
from typing import Any

_STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}h2{margin-top:1.6em}svg text{font:12px sans-serif}
.ex{font:12px monospace;color:#444;white-space:pre-wrap;word-break:break-all}"""
_BAR_HEIGHT = 18
_LABEL_WIDTH = 230
_BAR_WIDTH = 520

SCORE_BIN = 0.05  # width of the stored score histogram bins; the report merges them into <= 25 bars
SCORE_BARS = 25


def score_bin(value: float) -> int:
    """Index of the SCORE_BIN-wide bin holding `value` (bin k = [k x 0.05, (k + 1) x 0.05))."""
    return math.floor(round(value / SCORE_BIN, 6))  # 0.15 / 0.05 is 2.999...: round before floor


def score_bars(counts: dict[str, int]) -> list[tuple[str, int]]:
    """A stored histogram ({bin index: count}) as at most SCORE_BARS labelled bars over its range."""
    if not counts:
        return []
    stored = {int(k): v for k, v in counts.items()}
    low, high = min(stored), max(stored)
    per_bar = max(1, math.ceil((high - low + 1) / SCORE_BARS))
    bars = []
    for start in range(low, high + 1, per_bar):
        count = sum(stored.get(k, 0) for k in range(start, start + per_bar))
        lower, upper = round(start * SCORE_BIN, 6), round((start + per_bar) * SCORE_BIN, 6)
        bars.append((f"{lower:g} - {upper:g}", count))
    return bars


def bar_chart(rows: list[tuple[str, int]], color: str = "#4c78a8") -> str:
    """Horizontal bars, one per (label, count), scaled to the largest count."""
    if not rows:
        return "<p>(none)</p>"
    largest = max(count for _, count in rows) or 1
    height = _BAR_HEIGHT * len(rows) + 4
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_LABEL_WIDTH + _BAR_WIDTH + 90}" '
        f'height="{height}" role="img">'
    ]
    for i, (label, count) in enumerate(rows):
        y = i * _BAR_HEIGHT + 2
        width = round(_BAR_WIDTH * count / largest)
        parts.append(
            f'<text x="{_LABEL_WIDTH - 6}" y="{y + 13}" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{_LABEL_WIDTH}" y="{y}" width="{width}" height="{_BAR_HEIGHT - 4}" fill="{color}"/>'
            f'<text x="{_LABEL_WIDTH + width + 4}" y="{y + 13}">{count}</text>'
        )
    return "".join(parts) + "</svg>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{v}</td>' if isinstance(v, (int, float)) else f"<td>{escape(str(v))}</td>"
            for v in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"


def render_html(report: dict[str, Any], stage_order: tuple[str, ...]) -> str:
    t = report["totals"]
    remaining, funnel = t["num_input_lines"], [("input", t["num_input_lines"])]
    for stage in stage_order:
        removed = (
            sum(report["quarantined"].values())
            if stage == "read"
            else sum(report["dropped"].get(stage, {}).values())
        )
        remaining -= removed
        funnel.append((f"after {stage}", remaining))
    reasons = [(f"read/{r}", n) for r, n in sorted(report["quarantined"].items())]
    for stage, counts in report["dropped"].items():
        reasons += [(f"{stage}/{r}", n) for r, n in sorted(counts.items(), key=lambda x: -x[1])]
    out = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>data_prep report</title>"
        f"<style>{_STYLE}</style></head><body><h1>data_prep report</h1>",
        f"<p>{t['num_input_lines']} input lines &rarr; {t['num_kept']} kept, {t['num_dropped']} dropped, "
        f"{t['num_quarantined']} quarantined. Mojibake repaired in {t['num_repaired_mojibake']} documents; "
        f"{t['num_boilerplate_lines_removed']} boilerplate lines removed.</p>",
        "<h2>Funnel (documents remaining)</h2>",
        bar_chart(funnel),
        "<h2>Why documents were removed</h2>",
        bar_chart(reasons, "#e45756"),
        "<h2>Kept languages</h2>",
        bar_chart(sorted(report["languages"].items(), key=lambda x: -x[1])),
        "<h2>Kept document length (characters)</h2>",
        bar_chart(list(report["length_histogram"].items())),
        "<h2>Sources</h2>",
        _table(
            ["source", "input lines", "kept", "dropped", "quarantined", "kept chars"],
            [
                [
                    name,
                    row.get("num_input_lines", 0),
                    row.get("num_kept", 0),
                    row["num_dropped"],
                    row["num_quarantined"],
                    row.get("num_chars", 0),
                ]
                for name, row in report["per_source"].items()
            ],
        ),
        "<h2>PII redacted (kept documents)</h2>",
        bar_chart(sorted(report["pii"].items()), "#f58518"),
    ]
    for source, row in report["per_source"].items():
        for name, summary in (row.get("scores") or {}).items():
            out += [
                f"<h2>{escape(source)}: {escape(name)} (kept documents per score range)</h2>",
                bar_chart(score_bars(summary.get("histogram", {})), "#54a24b"),
            ]
    if report.get("tokens"):
        grouped = any("multiplier" in row for row in report["tokens"].values())  # buckets, rehydration
        out += [
            "<h2>Tokens</h2>",
            _table(
                ["source", "prefix", "documents", "tokens", "weight"] + ["multiplier"] * grouped,
                [
                    [name, row["prefix"], row["num_documents"], row["num_tokens"], round(row["weight"], 4)]
                    + [row.get("multiplier", 1.0)] * grouped
                    for name, row in report["tokens"].items()
                ],
            ),
        ]
    out.append("<h2>Examples per reason</h2>")
    for key, items in sorted(report["examples"].items()):
        out.append(f"<h3>{escape(key)}</h3>")
        for item in items:
            text = (item.get("excerpt") or item.get("raw") or "")[:300]
            out.append(
                f"<p><code>{escape(str(item.get('file')))}:{item.get('line')}</code> "
                f"{escape(str(item.get('detail', '')))}<br><span class='ex'>{escape(text)}</span></p>"
            )
    return "\n".join(out) + "\n</body></html>\n"

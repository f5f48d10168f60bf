"""One self-contained HTML page of a run's curves (inline SVG, no scripts, no downloads).

Panels: training and validation loss; validation loss per blend source (valid/<source>/loss);
downstream task scores (tasks/<task>/<metric>). Drawn from <output_dir>/metrics.jsonl, rewritten
atomically at each evaluation, so it can be opened (and reloaded) while the run goes on.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from kumihimo.core.files import write_text_atomic

PLOT_FILE = "metrics.html"
COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac")
WIDTH, HEIGHT, MARGIN = 640, 260, 48


def read_series(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of every finite number in metrics.jsonl (the last record of a
    step wins, as after a resume)."""
    series: dict[str, dict[int, float]] = {}
    if not metrics_file.is_file():
        return {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                series.setdefault(key, {})[step] = float(value)
    return {key: sorted(points.items()) for key, points in series.items()}


def line_chart(title: str, lines: dict[str, list[tuple[int, float]]]) -> str:
    """An SVG chart of several (step, value) lines with axes labels and a legend."""
    points = [p for pts in lines.values() for p in pts]
    if not points:
        return ""
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_hi, y_hi = (
        (x_hi if x_hi > x_lo else x_lo + 1),
        (y_hi if y_hi > y_lo else y_lo + 1e-9 + abs(y_lo) * 0.01),
    )

    def sx(x: float) -> float:
        return MARGIN + (x - x_lo) / (x_hi - x_lo) * (WIDTH - 2 * MARGIN)

    def sy(y: float) -> float:
        return HEIGHT - MARGIN + (y - y_lo) / (y_lo - y_hi) * (HEIGHT - 2 * MARGIN)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT + 18 * len(lines)}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{MARGIN}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>',
        f'<text x="{MARGIN}" y="{HEIGHT - MARGIN + 14}">{x_lo}</text>',
        f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - MARGIN + 14}" text-anchor="end">step {x_hi}</text>',
        f'<text x="{MARGIN - 4}" y="{MARGIN + 4}" text-anchor="end">{y_hi:.4g}</text>',
        f'<text x="{MARGIN - 4}" y="{HEIGHT - MARGIN}" text-anchor="end">{y_lo:.4g}</text>',
    ]
    for i, (name, pts) in enumerate(sorted(lines.items())):
        color = COLORS[i % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{path}"/>')
        if len(pts) < 30:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts]
        legend_y = HEIGHT + 4 + 18 * i
        last = pts[-1][1]
        parts.append(f'<rect x="{MARGIN}" y="{legend_y}" width="10" height="10" fill="{color}"/>')
        parts.append(
            f'<text x="{MARGIN + 16}" y="{legend_y + 9}">{html.escape(name)} (last {last:.4g})</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def panels(series: dict[str, list[tuple[int, float]]]) -> list[tuple[str, dict]]:
    loss = {k: series[k] for k in ("loss", "val_loss") if k in series}
    sources = {
        k.split("/")[1]: v for k, v in series.items() if k.startswith("valid/") and k.endswith("/loss")
    }
    tasks = {k.removeprefix("tasks/"): v for k, v in series.items() if k.startswith("tasks/")}
    return [
        ("loss (train, validation)", loss),
        ("validation loss per source", sources),
        ("downstream tasks", tasks),
    ]


def write_plot(output_dir: Path, title: str = "") -> Path:
    """Render <output_dir>/metrics.jsonl as <output_dir>/metrics.html; returns the page's path."""
    series = read_series(output_dir / "metrics.jsonl")
    charts = [line_chart(name, lines) for name, lines in panels(series) if lines]
    body = "\n".join(f"<div>{chart}</div>" for chart in charts) or "<p>no metrics yet</p>"
    page = (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title or output_dir.name)}</title></head>\n"
        f'<body style="font-family:sans-serif"><h2>{html.escape(title or str(output_dir))}</h2>\n{body}\n</body></html>\n'
    )
    path = output_dir / PLOT_FILE
    write_text_atomic(path, page)
    return path

"""A web-like benchmark corpus built from the bundled sample (kumihimo/sample/{ja,en}.jsonl.gz).

New documents are composed from the lines of 2-4 random sample documents of one language (so they are
distinct, like crawled pages of one site), and 8% are sample documents copied unchanged (planted dirt
included: mojibake, other languages, boilerplate, PII, duplicates), so every curation path is exercised.
Deterministic for a seed. Written to a temporary directory; never commit the output.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import platform
import random
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kumihimo.sample import sample_paths


def _load(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _compose(rng: random.Random, pool: list[dict], serial: int, lang: str) -> dict:
    if rng.random() < 0.08:
        base = rng.choice(pool)
        return {"id": f"{lang}-b{serial}", "text": base["text"], "url": base.get("url")}
    donors = rng.sample(pool, rng.randint(2, 4))
    lines = [ln for doc in donors for ln in doc["text"].split("\n") if ln.strip()]
    chosen = rng.sample(lines, min(len(lines), rng.randint(5, 12)))
    return {
        "id": f"{lang}-b{serial}",
        "text": "\n".join(chosen),
        "url": f"https://site{serial % 997}.example.jp/p/{serial}",
    }


def make_corpus(out_dir: Path, target_mb: float, seed: int = 0, ja_share: float = 0.66) -> dict[str, Path]:
    """Write ja.jsonl and en.jsonl (about `target_mb` MB in all, ja_share of it Japanese) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = sample_paths()
    rng = random.Random(seed)
    result = {}
    for lang, share in (("ja", ja_share), ("en", 1.0 - ja_share)):
        pool = _load(Path(paths[lang]))
        target = int(target_mb * share * 1e6)
        path = out_dir / f"{lang}.jsonl"
        written = serial = 0
        with open(path, "w", encoding="utf-8") as handle:
            while written < target:
                line = json.dumps(_compose(rng, pool, serial, lang), ensure_ascii=False) + "\n"
                handle.write(line)
                written += len(line.encode("utf-8"))
                serial += 1
        result[lang] = path
    return result


def run_isolated(fn: Callable[..., dict], *args: Any) -> dict:
    """Run fn(*args) in a fresh spawned process; its dict result plus that process's peak RSS (MiB)."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(_with_peak_rss, (fn, *args))


def _with_peak_rss(fn: Callable[..., dict], *args: Any) -> dict:
    result = fn(*args)
    peak_kib = max(
        resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    result["peak_rss_mib"] = peak_kib / 1024
    return result


def best_of(repeats: int, fn: Callable[..., dict], *args: Any) -> dict:
    """The fastest of `repeats` isolated runs (each result must hold 'cpu_s'); peak RSS is the largest."""
    runs = [run_isolated(fn, *args) for _ in range(repeats)]
    best = min(runs, key=lambda r: r["cpu_s"])
    return {
        **best,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
        "all_cpu_s": [r["cpu_s"] for r in runs],
    }


def cpu_seconds() -> float:
    """CPU time of this process and its waited-for children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> str:
    return (
        f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mb", type=float, default=60.0)
    args = parser.parse_args()
    for lang, path in make_corpus(args.out_dir, args.mb).items():
        print(lang, path, path.stat().st_size)

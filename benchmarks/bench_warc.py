"""WARC -> Japanese text: kumihimo's reader (kumihimo.core.warc) against datatrove's WarcReader + Trafilatura.

    python benchmarks/bench_warc.py --html-dir ja=/path/to/ja/html --html-dir en=/path/to/en/html \
        [--html-dir de=...] [--other-per-japanese 9] [--workdir DIR]

Builds two WARC files from local HTML pages (no network): `ja` holds every Japanese page once, a third
each in UTF-8, Shift_JIS and EUC-JP (the <meta charset> rewritten to match; `<html lang="ja">` added
where it was missing, so that kumihimo's pre-check lets every page through and extracts all of them);
`mix` holds the same Japanese pages among `--other-per-japanese` non-Japanese pages each, about Common
Crawl's share of Japanese. Then each pipeline reads each file in its own process, one at a time, on one
core, and reports response records per second of wall time and of CPU time, pages out, mean characters
per page out and the peak resident memory (the process, and separately its largest child: datatrove
extracts in a sandbox process).

Pipelines: `kumihimo` = fastwarc + pre-check + decoding + resiliparse (the default); `kumihimo-trafilatura`
= the same with input.warc.extractor=trafilatura; `kumihimo-no-precheck` = resiliparse on every HTML page;
`datatrove` = WarcReader (warcio, cchardet, libmagic) -> Trafilatura(favour_precision=True, timeout=1),
datatrove 0.10's defaults, as a datatrove pipeline runs them (no pre-check: every HTML page is extracted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINES = ("kumihimo", "kumihimo-trafilatura", "kumihimo-no-precheck", "datatrove")
ENCODINGS = (("UTF-8", "utf-8"), ("Shift_JIS", "cp932"), ("EUC-JP", "euc_jp"))
CHARSET = re.compile(rb"charset=[\"']?[A-Za-z0-9_-]+", re.IGNORECASE)
HTML_TAG = re.compile(rb"<html\b([^>]*)>", re.IGNORECASE)
# The XHTML pages' <?xml ...?> line: libmagic would call them XML (datatrove then skips them) and its
# encoding="UTF-8" would contradict a rewritten charset; web servers rarely send it.
XML_DECLARATION = re.compile(rb"^\s*<\?xml[^>]*\?>")


def _japanese_page(page: bytes, index: int) -> bytes:
    charset, codec = ENCODINGS[index % len(ENCODINGS)]
    match = HTML_TAG.search(page)
    if match and b"lang=" not in match.group(1).replace(b"xml:lang=", b""):
        page = page[: match.end() - 1] + b' lang="ja"' + page[match.end() - 1 :]
    page = CHARSET.sub(b"charset=" + charset.encode(), page)
    page = XML_DECLARATION.sub(b"", page)
    return page.decode("utf-8").encode(codec, errors="xmlcharrefreplace")


def build_warcs(html_dirs: dict[str, Path], other_per_japanese: int, out: Path) -> dict[str, Path]:
    from kumihimo.core.warc import warc_response, write_warc

    pages = {lang: sorted(folder.rglob("*.html")) for lang, folder in html_dirs.items()}
    japanese = [
        warc_response(f"https://ja.example/{i}", _japanese_page(p.read_bytes(), i))
        for i, p in enumerate(pages["ja"])
    ]
    others = [
        warc_response(f"https://{lang}.example/{i}", XML_DECLARATION.sub(b"", p.read_bytes()))
        for lang, files in pages.items()
        if lang != "ja"
        for i, p in enumerate(files)
    ]
    rng = random.Random(0)
    mixed = list(japanese)
    for _ in range(other_per_japanese * len(japanese) // max(1, len(others)) + 1):
        mixed.extend(others)
    mixed = japanese + mixed[len(japanese) : len(japanese) * (other_per_japanese + 1)]
    rng.shuffle(mixed)
    paths = {"ja": out / "ja.warc.gz", "mix": out / "mix.warc.gz"}
    write_warc(paths["ja"], japanese)
    write_warc(paths["mix"], mixed)
    return paths


def run_one(pipeline: str, path: str) -> dict:
    """Subprocess side: read one WARC file with one pipeline; counts, times and peak memory as JSON."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    num_records, texts = 0, []
    if pipeline.startswith("kumihimo"):
        from kumihimo.core.record_types import Record
        from kumihimo.core.warc import iter_warc

        extractor = "trafilatura" if pipeline == "kumihimo-trafilatura" else "resiliparse"
        for item in iter_warc(
            path, extractor=extractor, japanese_precheck=pipeline != "kumihimo-no-precheck"
        ):
            num_records += 1
            if isinstance(item, Record):
                texts.append(item.fields["text"])
    else:
        from datatrove.pipeline.extractors import Trafilatura
        from datatrove.pipeline.readers import WarcReader

        reader = WarcReader(os.path.dirname(path), glob_pattern=os.path.basename(path))
        from warcio.archiveiterator import ArchiveIterator

        with open(path, "rb") as handle:  # the same count as kumihimo's: response records
            num_records = sum(1 for r in ArchiveIterator(handle) if r.rec_type == "response")
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        texts = [doc.text for doc in Trafilatura().run(reader.run(None, 0, 1), 0, 1) if doc.text]
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "pipeline": pipeline,
        "records": num_records,
        "pages_out": len(texts),
        "mean_chars_out": round(sum(map(len, texts)) / max(1, len(texts))),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu + children.ru_utime + children.ru_stime, 2),
        "records_per_s": round(num_records / wall, 1),
        "records_per_cpu_s": round(num_records / (cpu + children.ru_utime + children.ru_stime), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "child_peak_rss_mib": round(children.ru_maxrss / 1024),
        "child_cpu_s": round(children.ru_utime + children.ru_stime, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--html-dir", action="append", default=[], metavar="LANG=DIR", help="ja=... is required"
    )
    parser.add_argument("--other-per-japanese", type=int, default=9)
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--run", nargs=2, metavar=("PIPELINE", "WARC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run)))
        return
    html_dirs = {spec.split("=", 1)[0]: Path(spec.split("=", 1)[1]) for spec in args.html_dir}
    if "ja" not in html_dirs or len(html_dirs) < 2:
        parser.error("give --html-dir ja=DIR and at least one non-Japanese --html-dir LANG=DIR")
    with tempfile.TemporaryDirectory(prefix="bench_warc_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        warcs = build_warcs(html_dirs, args.other_per_japanese, work)
        sizes = {name: os.path.getsize(p) for name, p in warcs.items()}
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.node()}, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
        )
        print(f"# WARC files: {', '.join(f'{n} {s / 1e6:.1f} MB' for n, s in sizes.items())}")
        print(
            "| file | pipeline | records | pages out | mean chars | records/s | records/CPU-s | peak RSS MiB |"
        )
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name, path in warcs.items():
            for pipeline in args.pipelines.split(","):
                proc = subprocess.run(
                    [sys.executable, __file__, "--run", pipeline, str(path)], capture_output=True, text=True
                )
                if proc.returncode != 0:
                    print(f"| {name} | {pipeline} | failed: {proc.stderr.strip().splitlines()[-1]} |")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                rss = f"{r['peak_rss_mib']}" + (
                    f" (+{r['child_peak_rss_mib']} child)" if r["child_peak_rss_mib"] > 0 else ""
                )
                print(
                    f"| {name} | {pipeline} | {r['records']} | {r['pages_out']} | {r['mean_chars_out']} | "
                    f"{r['records_per_s']} | {r['records_per_cpu_s']} | {rss} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

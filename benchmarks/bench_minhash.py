"""MinHash signature throughput per core, ours against datatrove's signature arithmetic.

    python benchmarks/bench_minhash.py --mb 20

Signatures of every document of the web-like corpus (bench_data_prep_corpus.py), in batches of 256
as the shard stage computes them, for 20 x 10 (LLM-jp v4) and 40 x 20 (Swallow) permutations. The
peer is datatrove's MinhashDedupSignature.get_signature (64-bit hashes modulo 2**61-1, one document
at a time) fed our character 5-gram shingles, with the same number of permutations: its own
get_shingles needs a spaCy word tokenizer, which is not installed here. Best of --repeats isolated runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_prep_corpus import best_of, machine, make_corpus  # noqa: E402


def _texts(corpus: str) -> list[str]:
    return [
        json.loads(line)["text"]
        for lang in ("ja", "en")
        for line in open(Path(corpus, f"{lang}.jsonl"), encoding="utf-8")
    ]


def ours(corpus: str, bands: int, rows: int, src: str | None = None) -> dict:
    if src:
        sys.path.insert(0, src)
    from kumihimo.data_prep.config import DedupConfig
    from kumihimo.data_prep.minhash import MinHasher

    texts = _texts(corpus)
    hasher = MinHasher(DedupConfig(num_bands=bands, rows_per_band=rows))
    start = time.process_time()
    for i in range(0, len(texts), 256):
        hasher.signatures(texts[i : i + 256])
    return {"cpu_s": time.process_time() - start, "mb": sum(len(t.encode()) for t in texts) / 1e6}


def datatrove_peer(corpus: str, bands: int, rows: int) -> dict:
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature

    from kumihimo.data_prep.config import DedupConfig
    from kumihimo.data_prep.minhash import MinHasher

    texts = _texts(corpus)
    shingler = MinHasher(DedupConfig(num_bands=1, rows_per_band=1))
    # the constructor loads a spaCy word tokenizer (get_shingles); get_signature needs only these fields
    step = MinhashDedupSignature.__new__(MinhashDedupSignature)
    step.config = MinhashConfig(num_buckets=bands, hashes_per_bucket=rows)
    step.num_hashes, step._parameters = bands * rows, None
    start = time.process_time()
    for text in texts:
        step.get_signature(shingler.shingles(text).astype("uint64").reshape(-1, 1))
    cpu = time.process_time() - start
    shingle_cpu = time.process_time()
    for text in texts:
        shingler.shingles(text)
    cpu -= time.process_time() - shingle_cpu  # the peer's own arithmetic only
    return {"cpu_s": cpu, "mb": sum(len(t.encode()) for t in texts) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline-src", help="another data_prep package to compare (see bench_data_prep.py)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_minhash_") as tmp:
        make_corpus(Path(tmp), args.mb)
        print(f"# {machine()}; corpus {args.mb:.0f} MB, best of {args.repeats} isolated runs")
        print(
            "| implementation | permutations | MB/s per core | CPU s | peak RSS MiB |\n|---|---|---:|---:|---:|"
        )
        runs = [("kumihimo", ours)]
        if args.baseline_src:
            runs.append(("kumihimo baseline", functools.partial(ours, src=args.baseline_src)))
        try:
            import datatrove  # noqa: F401

            runs.append(("datatrove get_signature", datatrove_peer))
        except ImportError:
            print("(datatrove not installed: peer skipped)")
        for bands, rows in ((20, 10), (40, 20)):
            for label, fn in runs:
                r = best_of(args.repeats, fn, tmp, bands, rows)
                print(
                    f"| {label} | {bands}x{rows} | {r['mb'] / r['cpu_s']:.2f} | {r['cpu_s']:.2f} "
                    f"| {r['peak_rss_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

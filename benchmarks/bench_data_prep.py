"""Curation throughput per core: repair + language ID + quality filters + decontamination + PII.

    python benchmarks/bench_data_prep.py --mb 60 [--baseline-src DIR]

Builds the web-like corpus of bench_data_prep_corpus.py in a temporary directory and curates it in one
process (per-shard phase only: dedup keys included, MinHash signatures off; bench_minhash.py measures
those), with the quickstart recipe's rules (NG words, host block list, decontamination against
kumihimo/sample/eval.jsonl). Prints input MB per CPU second, best of --repeats isolated runs, and the
peak RSS. --baseline-src runs the same on another copy of the data_prep package (e.g. the previous
commit, from `git archive HEAD data_prep | tar -x -C DIR`) for a before/after figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_prep_corpus import best_of, cpu_seconds, machine, make_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def curate_shards(corpus: str, src: str | None, fuzzy: bool) -> dict:
    if src:
        sys.path.insert(0, src)
    from kumihimo.data_prep import shard_stage
    from kumihimo.data_prep.config import load_config
    from kumihimo.data_prep.decontam import build_eval_index, save_eval_index

    try:
        from kumihimo.data_prep.shards import plan_shards
    except ImportError:  # a baseline from before the readers were split (issue 24)
        from kumihimo.data_prep.jsonl_io import plan_shards

    sources = f"[{{name: ja, paths: [{corpus}/ja.jsonl]}}, {{name: en, paths: [{corpus}/en.jsonl]}}]"
    config = load_config(
        REPO / "configs/data_prep/quickstart.yaml",
        [
            f"input.sources={sources}",
            f"dedup.fuzzy={str(fuzzy).lower()}",
            "decontam.eval_paths=[" + str(REPO / "kumihimo/sample/eval.jsonl") + "]",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as tmp:
        out = Path(tmp)
        start = cpu_seconds()
        save_eval_index(build_eval_index(config.decontam), out / "eval.npy")
        tools = shard_stage.build_tools(config, out / "eval.npy")
        shards = plan_shards(config)
        for shard in shards:
            shard_stage.process_shard(shard, tools, out)
        cpu = cpu_seconds() - start
    num_bytes = sum(Path(corpus, f"{lang}.jsonl").stat().st_size for lang in ("ja", "en"))
    return {"cpu_s": cpu, "mb": num_bytes / 1e6, "module": shard_stage.__file__}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=60.0, help="corpus size (MB of JSONL)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-src", help="a directory holding another data_prep package to compare")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        make_corpus(Path(tmp), args.mb)
        print(f"# {machine()}; corpus {args.mb:.0f} MB (ja 66%), best of {args.repeats} isolated runs")
        print("| code | what | MB/s per core | CPU s | peak RSS MiB |\n|---|---|---:|---:|---:|")
        variants = [("this tree", None)] + ([("baseline", args.baseline_src)] if args.baseline_src else [])
        for label, src in variants:
            for fuzzy, what in ((False, "curation (no MinHash)"), (True, "curation + MinHash 20x10")):
                r = best_of(args.repeats, curate_shards, tmp, src, fuzzy)
                print(
                    f"| {label} | {what} | {r['mb'] / r['cpu_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mib']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

"""Tokenize-to-.bin/.idx throughput per core: kumihimo vs SentencePiece alone vs Megatron-LM.

    python benchmarks/bench_tokenize.py --tokenizer tok/tokenizer.model --mb 20 [--megatron DIR]

Input: the curated-style JSONL of the web-like corpus (bench_data_prep_corpus.py). All three encode
the same documents with the same .model on one core:
  kumihimo      `build_datasets` with num_workers=1 and tokenize.add_bos=false, append_eod=true
  sentencepiece SentencePieceProcessor.Encode(batch, num_threads=1) on texts already in memory
                (no JSON parsing, no writing: the ceiling for any tool), returning lists of Python
                ints (out_type=int) and int32 arrays (out_type="numpy", what kumihimo uses)
  megatron      DIR/tools/preprocess_data.py --tokenizer-type SentencePieceTokenizer --append-eod
                --workers 1, with PYTHONPATH=DIR (a Megatron-LM checkout outside this repository)
MB/s are JSONL bytes per CPU second (process + children), best of --repeats runs; the .bin/.idx of
kumihimo and Megatron-LM are compared byte for byte.

    python benchmarks/bench_tokenize.py --tokenizer tok/tokenizer.model --mb 20 --tasks 1 2 4

adds wall-clock runs (best of --repeats) of `kumihimo data tokenize` (build_datasets in this process, each run in a fresh
output folder): one writer with num_workers=1 and =2, then tokenize.tasks=N for each N on the local
executor (a pool of min(N, cores) processes, tokenize.part_bytes = --part-mb), with the time of the merge
alone, and whether every run's .bin/.idx equal the first run's byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_prep_corpus import best_of, cpu_seconds, machine, make_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _jsonl(tmp: str) -> Path:
    return Path(tmp, "all.jsonl")


def kumihimo(tmp: str, model: str, out: str) -> dict:
    from kumihimo.data_prep.config import load_config
    from kumihimo.data_prep.tokenize_stage import build_datasets

    Path(out, "curated").mkdir(parents=True, exist_ok=True)
    os.link(_jsonl(tmp), Path(out, "curated", "all.jsonl")) if not Path(
        out, "curated", "all.jsonl"
    ).exists() else None
    for stale in Path(out).glob("work/tokenize/*.json"):
        stale.unlink()
    config = load_config(
        REPO / "configs/data_prep/quickstart.yaml",
        [
            f"output_dir={out}",
            f"input.sources=[{{name: all, paths: [{_jsonl(tmp)}]}}]",
            "tokenize.add_bos=false",
            "tokenize.append_eod=true",
            "num_workers=1",
        ],
    )
    start = cpu_seconds()
    build_datasets(config, model)
    return {"cpu_s": cpu_seconds() - start, "mb": _jsonl(tmp).stat().st_size / 1e6}


def sentencepiece_alone(tmp: str, model: str, _out: str, out_type: str = "int") -> dict:
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=model)
    with open(_jsonl(tmp), encoding="utf-8") as handle:
        texts = [json.loads(line)["text"] for line in handle]
    start = time.process_time()
    for i in range(0, len(texts), 512):
        processor.Encode(texts[i : i + 512], out_type=int if out_type == "int" else out_type, num_threads=1)
    return {"cpu_s": time.process_time() - start, "mb": _jsonl(tmp).stat().st_size / 1e6}


def megatron(tmp: str, model: str, out: str, checkout: str) -> dict:
    command = [
        sys.executable,
        f"{checkout}/tools/preprocess_data.py",
        "--input",
        str(_jsonl(tmp)),
        "--output-prefix",
        f"{out}/megatron",
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        model,
        "--append-eod",
        "--workers",
        "1",
    ]
    start = cpu_seconds()
    done = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": checkout}
    )
    # its own progress lines give the encoding rate without the ~8 s of importing torch and megatron
    rates = [line for line in (done.stdout + done.stderr).splitlines() if "MB/s" in line]
    return {
        "cpu_s": cpu_seconds() - start,
        "mb": _jsonl(tmp).stat().st_size / 1e6,
        "note": rates[-1].strip() if rates else "",
    }


def _timed_tokenize(tmp: str, model: str, out: Path, overrides: list[str]) -> dict:
    """Wall seconds of one `tokenize` call in a fresh output folder, and of its merge step alone."""
    from kumihimo.data_prep import tokenize_parts
    from kumihimo.data_prep.config import load_config

    shutil.rmtree(out, ignore_errors=True)
    (out / "curated").mkdir(parents=True)
    os.link(_jsonl(tmp), out / "curated" / "all.jsonl")
    config = load_config(
        REPO / "configs/data_prep/quickstart.yaml",
        [
            f"output_dir={out}",
            f"input.sources=[{{name: all, paths: [{_jsonl(tmp)}]}}]",
            "tokenize.add_bos=false",
            "tokenize.append_eod=true",
            *overrides,
        ],
    )
    merge = tokenize_parts.merge_parts
    merge_s = []

    def timed_merge(*args):
        start = time.perf_counter()
        result = merge(*args)
        merge_s.append(time.perf_counter() - start)
        return result

    tokenize_parts.merge_parts = timed_merge
    try:
        start = time.perf_counter()
        tokenize_parts.tokenize(config, model)
        wall = time.perf_counter() - start
    finally:
        tokenize_parts.merge_parts = merge
    return {"wall_s": wall, "merge_s": sum(merge_s), "mb": _jsonl(tmp).stat().st_size / 1e6}


def task_runs(tmp: str, model: str, task_counts: list[int], part_mb: float, repeats: int) -> None:
    """One writer vs N tasks, wall clock (best of `repeats`), on this machine's cores; outputs compared
    byte for byte."""
    cores = os.cpu_count() or 1
    runs = [
        ("one writer, num_workers=1", ["num_workers=1"]),
        ("one writer, num_workers=2", ["num_workers=2"]),
    ]
    runs += [
        (
            f"tokenize.tasks={n} (local pool of {min(n, cores)})",
            [
                f"tokenize.tasks={n}",
                f"num_workers={min(n, cores)}",
                f"tokenize.part_bytes={int(part_mb * 1e6)}",
            ],
        )
        for n in task_counts
    ]
    print(
        "\n| run | wall s | MB/s (wall) | merge s | .bin MB | .bin/.idx = first run |\n|---|---:|---:|---:|---:|---|"
    )
    first = None
    for index, (label, overrides) in enumerate(runs):
        out = Path(tmp, f"tasks{index}")
        r = min(
            (_timed_tokenize(tmp, model, out, overrides) for _ in range(repeats)), key=lambda r: r["wall_s"]
        )
        files = [out / "datasets" / f"all_text_document.{ext}" for ext in ("bin", "idx")]
        first = first or files
        same = all(filecmp.cmp(a, b, shallow=False) for a, b in zip(files, first, strict=True))
        merge = f"{r['merge_s']:.2f}" if "tasks" in label else "-"
        bin_mb = files[0].stat().st_size / 1e6
        print(
            f"| {label} | {r['wall_s']:.2f} | {r['mb'] / r['wall_s']:.2f} | {merge} | {bin_mb:.1f} | {same} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    parser.add_argument("--mb", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--megatron", help="a Megatron-LM checkout (for tools/preprocess_data.py)")
    parser.add_argument("--tasks", type=int, nargs="*", default=[], help="also time tokenize.tasks=N runs")
    parser.add_argument("--part-mb", type=float, default=2.0, help="tokenize.part_bytes of those runs, in MB")
    parser.add_argument("--only-tasks", action="store_true", help="skip the per-core table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
        paths = make_corpus(Path(tmp), args.mb)
        with open(_jsonl(tmp), "w", encoding="utf-8") as out:
            for path in paths.values():
                out.write(path.read_text(encoding="utf-8"))
        print(f"# {machine()}; {_jsonl(tmp).stat().st_size / 1e6:.0f} MB JSONL, best of {args.repeats} runs")
        if args.tasks:
            task_runs(tmp, str(Path(args.tokenizer).resolve()), args.tasks, args.part_mb, args.repeats)
        if args.only_tasks:
            return
        print("| tool | MB/s per core | CPU s | peak RSS MiB |\n|---|---:|---:|---:|")
        runs = [
            ("SentencePiece Encode alone (out_type=int)", sentencepiece_alone, ("int",)),
            ("SentencePiece Encode alone (out_type=numpy)", sentencepiece_alone, ("numpy",)),
            ("kumihimo data tokenize", kumihimo, ()),
        ]
        if args.megatron:
            runs.append(("Megatron-LM preprocess_data.py", megatron, (args.megatron,)))
        for label, fn, extra in runs:
            r = best_of(args.repeats, fn, tmp, str(Path(args.tokenizer).resolve()), tmp, *extra)
            print(
                f"| {label} | {r['mb'] / r['cpu_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_rss_mib']:.0f} |",
                flush=True,
            )
            if r.get("note"):
                print(f"  ({label}, its last progress line: {r['note']})")
        if args.megatron:
            same = all(
                filecmp.cmp(
                    f"{tmp}/datasets/all_text_document.{ext}",
                    f"{tmp}/megatron_text_document.{ext}",
                    shallow=False,
                )
                for ext in ("bin", "idx")
            )
            print(f"kumihimo and Megatron-LM .bin/.idx byte-identical: {same}")


if __name__ == "__main__":
    main()

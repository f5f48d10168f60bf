"""Check that this tree's data_prep curates byte-identically to a baseline checkout of kumihimo.

    mkdir -p /tmp/base && git archive HEAD | tar -x -C /tmp/base
    python benchmarks/check_data_prep_identity.py --baseline-src /tmp/base [--mb 20] [--keep DIR]
    # real documents instead of the generated corpus, this tree on 3 datatrove tasks, outputs only:
    python benchmarks/check_data_prep_identity.py --baseline-src /tmp/base \
        --ja /tmp/calibration/real_ja.jsonl --en /tmp/calibration/real_en.jsonl \
        --current "executor.kind=datatrove-local" --current executor.tasks=3 --outputs-only

Builds the web-like corpus of bench_data_prep_corpus.py (or copies the --ja / --en JSONL files) plus
planted bad lines (broken JSON, a missing or non-string text, a non-object line, a German/English mix),
so the quarantine and language paths run. `--current` adds overrides to this tree's runs only (an
executor the baseline runs differently); `--outputs-only` compares what a user gets (curated, dropped
and quarantine files, the reports) and not `work/`, whose intermediate files a baseline from before the
distributed dedup stages lays out differently.
Then runs the full `curate` (shards, global dedup, merge, reports) of the quickstart and llmjp-web
recipes, once with this tree's data_prep and once with the baseline's, each in its own subprocess with
its package first on sys.path. Every output file is compared by SHA-256: curated, dropped and quarantine
files, report.md/.json/.html, the dedup decision, each shard's candidates, drops, ids, exact keys, MinHash
signatures and stats. Prints a summary per recipe; exits 1 if any file differs or exists on one side only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_data_prep_corpus import make_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPES = ("quickstart", "llmjp-web")
# The one file skipped: data_prep_config.yaml, the resolved config saved beside the outputs, holds
# output_dir (<work>/current/<recipe> vs <work>/baseline/<recipe>). No output holds a timestamp, and no
# other holds a path of the output tree. Input paths (in records, reports, work/run.json with the inputs'
# mtimes) are the same for both runs, which read one corpus, so those files are compared; run.json also
# holds a digest of the curation config, so a baseline whose config defaults differ shows up there.
SKIPPED = {"data_prep_config.yaml"}
BAD_LINES = [
    '{"id": "bad1", "text": \n',  # truncated JSON
    '{"id": "bad2"}\n',  # no text field
    "[1, 2]\n",  # not an object
    '{"id": "bad3", "text": 5}\n',  # text is not a string
]


def build_corpus(corpus: Path, mb: float, seed: int, real: dict[str, Path | None]) -> None:
    if any(real.values()):
        corpus.mkdir(parents=True)
        paths = {}
        for lang, source in real.items():
            paths[lang] = corpus / f"{lang}.jsonl"
            paths[lang].write_bytes(source.read_bytes() if source else b"")
    else:
        paths = make_corpus(corpus, mb, seed=seed)
    for lang, path in paths.items():
        mixed = (
            "Das Wetter ist heute sehr schön und wir gehen spazieren. " * 5
            + "The weather is nice today and we go for a walk in the park. " * 5
        )
        with open(path, "a", encoding="utf-8") as handle:
            handle.writelines(BAD_LINES)
            handle.write(json.dumps({"id": f"{lang}-mix", "text": mixed}) + "\n")


def _map_stage_folders(src: Path) -> None:
    """Import `src`'s pretrain/, data_prep/ and tokenizer/ as kumihimo.<folder>, as pyproject.toml's
    package-dir mapping does for an install (older checkouts reached them through links in kumihimo/,
    which sys.path alone follows)."""
    import kumihimo

    for stage in ("tokenizer", "data_prep", "pretrain"):
        if (src / "kumihimo" / stage).exists():
            continue  # a checkout from before the mapping: its link leads there
        folder = src / stage
        spec = importlib.util.spec_from_file_location(
            f"kumihimo.{stage}", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        setattr(kumihimo, stage, module)
        spec.loader.exec_module(module)


def run_curate(src: str, corpus: str, out: str, extra: list[str]) -> None:
    """Subprocess side: curate every recipe with the kumihimo checkout under `src` (first on sys.path, its
    stage folders imported as pyproject.toml maps them), with the `extra` overrides."""
    sys.path.insert(0, src)
    # this script imported kumihimo (the sample corpus) from the installed tree before `src` came first
    for name in [m for m in sys.modules if m == "kumihimo" or m.startswith("kumihimo.")]:
        del sys.modules[name]
    _map_stage_folders(Path(src))
    import kumihimo.data_prep
    from kumihimo.data_prep.config import load_config
    from kumihimo.data_prep.pipeline import curate

    package = Path(kumihimo.data_prep.__file__).resolve().parent
    if package != Path(src).resolve() / "data_prep":
        raise SystemExit(f"imported data_prep from {package}, not from {src}; pass the root of a checkout")
    sources = f"[{{name: ja, paths: [{corpus}/ja.jsonl]}}, {{name: en, paths: [{corpus}/en.jsonl]}}]"
    for recipe in RECIPES:
        overrides = [
            f"input.sources={sources}",
            f"output_dir={Path(out) / recipe}",
            "num_workers=1",
            "input.shard_bytes=8000000",
            f"decontam.eval_paths=[{REPO / 'kumihimo/sample/eval.jsonl'}]",
        ]
        if recipe == "llmjp-web":  # the sample eval set's fields, not the recipe's
            overrides.append("decontam.eval_fields=[question, passage, answer]")
        result = curate(load_config(REPO / f"configs/data_prep/{recipe}.yaml", [*overrides, *extra]))
        print(
            f"  {recipe}: kept {result.num_kept}, dropped {result.num_dropped}, "
            f"quarantined {result.num_quarantined}",
            flush=True,
        )


def digests(root: Path, outputs_only: bool) -> dict[str, str]:
    files = (
        p
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and str(p.relative_to(root)) not in SKIPPED
        and not (outputs_only and p.relative_to(root).parts[0] == "work")
    )
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def compare(work: Path, outputs_only: bool) -> int:
    """Print a summary per recipe; the number of differing files in all."""
    num_differing = 0
    for recipe in RECIPES:
        current = digests(work / "current" / recipe, outputs_only)
        baseline = digests(work / "baseline" / recipe, outputs_only)
        differing = sorted(k for k in current.keys() | baseline.keys() if current.get(k) != baseline.get(k))
        num_differing += len(differing)
        print(f"{recipe}: {len(current.keys() | baseline.keys())} files compared, {len(differing)} differ")
        for name in differing:
            where = (
                ""
                if name in current and name in baseline
                else " (only in current)"
                if name in current
                else " (only in baseline)"
            )
            print(f"  DIFFERS {recipe}/{name}{where}")
    return num_differing


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="directory holding the baseline data_prep/ package (e.g. from git archive)",
    )
    parser.add_argument("--mb", type=float, default=20.0, help="corpus size in MB of JSONL (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument(
        "--keep", type=Path, help="write corpus and outputs here (new or empty) and keep them"
    )
    parser.add_argument(
        "--ja", type=Path, help="Japanese documents (JSONL with id and text) to curate instead"
    )
    parser.add_argument(
        "--en", type=Path, help="English documents (JSONL with id and text) to curate instead"
    )
    parser.add_argument(
        "--current",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override for this tree's runs only, e.g. executor.tasks=3; repeatable",
    )
    parser.add_argument(
        "--outputs-only", action="store_true", help="compare the outputs a user gets, not work/"
    )
    parser.add_argument("--run-curate", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_curate:
        src, corpus, out, *extra = args.run_curate
        run_curate(src, corpus, out, extra)
        return
    if args.baseline_src is None:
        parser.error("--baseline-src DIR is required (the root of a baseline checkout of kumihimo)")
    if not (args.baseline_src / "data_prep" / "__init__.py").is_file():
        parser.error(
            f"--baseline-src={args.baseline_src} holds no data_prep/__init__.py (not a checkout root)"
        )
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep={args.keep} is not empty; curate would resume the runs found there")
    with tempfile.TemporaryDirectory(prefix="data_prep_identity_") as tmp:
        work = (args.keep or Path(tmp)).resolve()
        real = {"ja": args.ja, "en": args.en}
        what = ", ".join(f"{k}: {v}" for k, v in real.items() if v) or f"{args.mb:g} MB, seed {args.seed}"
        print(f"corpus: {what}, {len(BAD_LINES) + 1} planted lines per language, in {work}")
        build_corpus(work / "corpus", args.mb, args.seed, real)
        for label, src, extra in (
            ("current", REPO, args.current),
            ("baseline", args.baseline_src.resolve(), []),
        ):
            print(f"{label}: {src / 'data_prep'} {' '.join(extra)}", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--run-curate",
                    str(src),
                    str(work / "corpus"),
                    str(work / label),
                    *extra,
                ],
                check=True,
            )
        num_differing = compare(work, args.outputs_only)
    print("IDENTICAL" if num_differing == 0 else f"DIFFERENT: {num_differing} files differ")
    sys.exit(1 if num_differing else 0)


if __name__ == "__main__":
    main()

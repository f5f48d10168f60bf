"""Swallow's reference quality code and kumihimo, side by side on the same real Japanese documents.

    mkdir -p /work/peers/swallow-corpus
    git clone https://github.com/swallow-llm/swallow-corpus /work/peers/swallow-corpus   # not vendored
    python benchmarks/quality_calibration.py --out /tmp/calibration                       # real documents
    python benchmarks/check_swallow_agreement.py --reference /work/peers/swallow-corpus \\
        --docs /tmp/calibration/real_ja.jsonl /tmp/calibration/junk_ja.jsonl

The reference is imported from --reference at run time (quality.py for the metrics and apply_v1, footer.py
and kutoten.py for the clean-up); nothing of it is copied into kumihimo. For every document both compute
every metric; the script prints, per metric, how many documents get an equal value (floats within 1e-12),
then how often the keep/drop decisions agree: the reference's apply_v1 against kumihimo's rules with the
swallow-v1 recipe (exact reference behaviour) and with the llmjp-web recipe (its deliberate deviations),
then the clean-up stage's agreement, and the CPU time each side took: the reference's quality.main +
apply_v1, kumihimo's metrics + rules, its whole quality stage, and its whole per-shard curation (repair,
language ID, quality, clean-up, decontamination, PII, exact keys, MinHash) with the llmjp-web recipe. Exits 1 when a metric or a decision
of the swallow-v1 recipe disagrees on more than 0.5% of documents.

The NG-word rule is checked against the reference's longest-match scan (ngword.py LongestMatch.finditer)
over a small word list, on dartsclone's trie built as the reference builds it (`pip install dartsclone`);
without that package a lookup over the same words stands in for the trie (only the scan is then the
reference's).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NG_WORDS = [
    "設定",
    "ファイル",
    "オプション",
    "画像",
    "レイヤー",
    "表示",
    "選択",
]  # common words: many matches


def load_reference(directory: Path):
    if not (directory / "quality.py").is_file():
        raise SystemExit(
            f"--reference {directory} has no quality.py; get it with "
            "`git clone https://github.com/swallow-llm/swallow-corpus /work/peers/swallow-corpus`"
        )
    sys.path.insert(0, str(directory))
    words = set(NG_WORDS)

    class _Trie:  # what ngword.py needs of dartsclone.DoubleArray: lengths of the words prefixing s
        def common_prefix_search(self, data: bytes, pair_type=False):
            text = data.decode("utf-8", errors="ignore")
            return [
                len(w) for w in words if text.startswith(w)
            ]  # values = character lengths, as ngword.py builds them

    try:  # the real trie when the dartsclone package is installed (pip install dartsclone)
        importlib.import_module("dartsclone")
    except ImportError:
        sys.modules["dartsclone"] = types.SimpleNamespace(DoubleArray=_Trie)
    return (
        importlib.import_module("quality"),
        importlib.import_module("ngword"),
        importlib.import_module("footer"),
        importlib.import_module("kutoten"),
    )


def speed(texts: list[str], workdir: Path) -> dict[str, float]:
    """CPU seconds of kumihimo's metrics + rules (all values), its quality stage (n-grams counted only
    where the other rules keep a document) with both recipes, and its whole per-shard curation (repair ..
    MinHash signatures, recipe llmjp-web), each over `texts`."""
    from kumihimo.data_prep import ja_metrics, shard_stage
    from kumihimo.data_prep.config import load_config
    from kumihimo.data_prep.decontam import build_eval_index, save_eval_index
    from kumihimo.data_prep.quality import QualityFilter
    from kumihimo.data_prep.shards import plan_shards

    out = {}
    swallow = QualityFilter(load_config(REPO / "configs/data_prep/swallow-v1.yaml").filters)
    start = time.process_time()
    for text in texts:
        swallow.japanese_verdict(ja_metrics.japanese_metrics(text, True))
    out["kumihimo every metric + rules (swallow-v1)"] = time.process_time() - start
    start = time.process_time()
    for text in texts:
        swallow.check(text, "ja", None)
    out["kumihimo quality stage (swallow-v1)"] = time.process_time() - start
    web = QualityFilter(load_config(REPO / "configs/data_prep/llmjp-web.yaml").filters)
    start = time.process_time()
    for text in texts:
        web.check(text, "ja", None)
    out["kumihimo quality stage (llmjp-web)"] = time.process_time() - start
    workdir.mkdir(parents=True, exist_ok=True)
    corpus = workdir / "docs.jsonl"
    with open(corpus, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": str(i), "text": text}, ensure_ascii=False) + "\n")
    config = load_config(
        REPO / "configs/data_prep/llmjp-web.yaml",
        [f"input.sources=[{{name: ja, paths: [{corpus}]}}]", f"output_dir={workdir / 'out'}"],
    )
    shards_dir = workdir / "shards"
    shutil.rmtree(shards_dir, ignore_errors=True)
    shards_dir.mkdir()
    save_eval_index(build_eval_index(config.decontam), workdir / "eval.npy")
    tools = shard_stage.build_tools(config, workdir / "eval.npy")
    start = time.process_time()
    for shard in plan_shards(config):
        shard_stage.process_shard(shard, tools, shards_dir)
    out["kumihimo whole curation per shard (llmjp-web)"] = time.process_time() - start
    return out


def read_docs(paths: list[Path]) -> list[str]:
    return [json.loads(line)["text"] for path in paths for line in open(path, encoding="utf-8")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference", type=Path, default=Path("/work/peers/swallow-corpus"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/swallow_agreement"), help="scratch space")
    parser.add_argument(
        "--docs",
        type=Path,
        nargs="+",
        default=[Path("/tmp/calibration/real_ja.jsonl"), Path("/tmp/calibration/junk_ja.jsonl")],
    )
    args = parser.parse_args()
    quality, ngword, footer, kutoten = load_reference(args.reference)
    from kumihimo.data_prep import ja_metrics
    from kumihimo.data_prep.cleanup import normalize_punctuation, trim_footer
    from kumihimo.data_prep.config import load_config
    from kumihimo.data_prep.quality import QualityFilter, longest_matches

    texts = [t for t in read_docs(args.docs) if len(t) >= 10]  # the reference raises on shorter texts
    mb = sum(len(t.encode()) for t in texts) / 1e6
    start = time.process_time()
    theirs = [quality.main({"text": t}) for t in texts]
    reference_verdicts = [quality.apply_v1(q) for q in theirs]
    reference_seconds = time.process_time() - start
    ours = [ja_metrics.japanese_metrics(t, count_blank_lines=True) for t in texts]
    print(f"{len(texts)} documents, {mb:.1f} MB, from {', '.join(map(str, args.docs))}")
    print(f"metric agreement (equal values, of {len(texts)}):")
    worst = 1.0
    for name in ours[0]:
        equal = sum(abs(a[name] - b[name]) <= 1e-12 for a, b in zip(ours, theirs))
        worst = min(worst, equal / len(texts))
        print(f"  {name:45s} {equal:6d}  {100 * equal / len(texts):6.2f}%")
    failures = worst < 0.995
    for recipe in ("swallow-v1", "llmjp-web"):
        config = load_config(REPO / f"configs/data_prep/{recipe}.yaml")
        qf = QualityFilter(config.filters)
        verdicts = [
            qf.japanese_verdict(ja_metrics.japanese_metrics(t, config.filters.ja.count_blank_lines)) is None
            for t in texts
        ]
        same = sum(a == b for a, b in zip(verdicts, reference_verdicts))
        print(
            f"keep/drop agreement, {recipe:10s}: {same}/{len(texts)} = {100 * same / len(texts):.2f}% "
            f"(kept: reference {sum(reference_verdicts)}, kumihimo {sum(verdicts)})"
        )
        if recipe == "swallow-v1" and same / len(texts) < 0.995:
            failures = True
    checker = ngword.LongestMatch()
    trie = sys.modules["dartsclone"]
    if isinstance(trie, types.ModuleType):  # real dartsclone: build it as Swallow does (values = lengths)
        keys = sorted(NG_WORDS, key=lambda w: w.encode("utf-8"))
        checker.darts.build([w.encode("utf-8") for w in keys], values=[len(w) for w in keys])
        print("NG-word trie: dartsclone (the reference's own)")
    else:
        checker.darts = trie.DoubleArray()
        print("NG-word trie: a stand-in over the same words (dartsclone is not installed)")
    # the reference re-encodes the rest of the text at every position (quadratic): a sample is enough
    sample = texts[:: max(1, len(texts) // 200)]
    same_ng = sum(
        sum(len(w) for w in checker.finditer(t)) == sum(map(len, longest_matches(t, NG_WORDS)))
        for t in sample
    )
    print(
        f"NG-word longest-match characters equal: {same_ng}/{len(sample)} (every {len(texts) // len(sample)}th)"
    )
    # the documents as they are, and every 10th written with ，． (the case the normalisation is for)
    cleanup_texts = texts + [t.replace("、", "，").replace("。", "．") for t in texts[::10]]
    same_clean = sum(
        kutoten.normalize(t)[0] == normalize_punctuation(t)[0]
        and footer.apply(t) == trim_footer(t, footer.footer_words, 10, 0.3)[0]
        for t in cleanup_texts
    )
    print(f"clean-up (kuten/toten, footer) equal: {same_clean}/{len(cleanup_texts)}")
    print(
        f"CPU seconds on the {mb:.1f} MB above (one process, {platform.processor() or platform.machine()}):"
    )
    print(
        f"  reference quality.main + apply_v1         {reference_seconds:7.2f} s  {mb / reference_seconds:6.2f} MB/s"
    )
    for label, seconds in speed(texts, args.workdir).items():
        print(
            f"  {label:42s} {seconds:7.2f} s  {mb / seconds:6.2f} MB/s  "
            f"{reference_seconds / seconds:5.1f}x the reference"
        )
    return 1 if failures or same_ng < len(sample) or same_clean < len(cleanup_texts) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Per quality rule, how many real and how many junk documents it removes, for one or more recipes.

    python benchmarks/quality_calibration.py --out /tmp/calibration      # build the calibration set first
    python benchmarks/calibrate_quality.py --set /tmp/calibration --lang ja \\
        --recipes swallow-v1 llmjp-web

Every document goes through kumihimo's language ID and the recipe's quality stage (boilerplate removal,
compression window, the language's rules; NG words and hosts are lists, not calibrated here). A document
that repair cannot mend is counted as removed by repair, one that language ID does not label --lang
(at the recipe's min_confidence) as removed by langid.
Prints a Markdown table per recipe: for each rule, the documents it alone would remove (of those reaching
the quality stage) and the documents it removes as the first rule broken, then the totals kept, with the
real documents split into plain pages and pages dressed as articles.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def evaluate(recipe: str, docs: list[dict], lang: str) -> dict:
    from kumihimo.data_prep.config import load_config
    from kumihimo.data_prep.langid import identify_batch
    from kumihimo.data_prep.quality import QualityFilter, first_broken
    from kumihimo.data_prep.repair import repair_text

    config = load_config(REPO / f"configs/data_prep/{recipe}.yaml")
    config.filters.ng_words.words = []
    config.filters.ng_words.words_file = None
    config.filters.refilterable = True  # measure every value, also where an earlier rule already drops
    qf = QualityFilter(config.filters)
    repaired = [repair_text(d["text"], config.repair) for d in docs]
    texts = [text for text, _, _ in repaired]
    labels = identify_batch(texts, config.langid)
    alone: Counter[str] = Counter()
    first: Counter[str] = Counter()
    kept = []
    for (text, repair_drop, _), (label, confidence) in zip(repaired, labels):
        if repair_drop:
            first["repair"] += 1
            kept.append(False)
            continue
        if label != lang or confidence < config.langid.min_confidence:
            first["langid"] += 1
            kept.append(False)
            continue
        measured = qf.measure(text, lang, None)
        if measured.verdict:
            first[measured.verdict[0]] += 1
            kept.append(False)
            continue
        rules = qf.rules(lang)
        broken = {reason for reason, *rest in rules if first_broken([(reason, *rest)], measured.metrics)}
        alone.update(broken)
        verdict = first_broken(rules, measured.metrics)
        if verdict:
            first[verdict[0]] += 1
        kept.append(verdict is None)
    return {"alone": alone, "first": first, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", type=Path, default=Path("/tmp/calibration"))
    parser.add_argument("--lang", default="ja", choices=["ja", "en"])
    parser.add_argument("--recipes", nargs="+", default=["swallow-v1", "llmjp-web"])
    args = parser.parse_args()
    real = load(args.set / f"real_{args.lang}.jsonl")
    junk = load(args.set / f"junk_{args.lang}.jsonl")
    articles = [d["kind"].endswith("-article") for d in real]
    for recipe in args.recipes:
        r = evaluate(recipe, real, args.lang)
        j = evaluate(recipe, junk, args.lang)
        print(f"\n### {recipe} ({args.lang}): {len(real)} real documents, {len(junk)} junk documents\n")
        print(
            "| rule | real removed (alone) | junk removed (alone) | real removed (first) | junk removed (first) |"
        )
        print("|---|---:|---:|---:|---:|")
        for rule in sorted(set(r["alone"]) | set(j["alone"]) | set(r["first"]) | set(j["first"])):
            print(
                f"| {rule} | {r['alone'][rule]} | {j['alone'][rule]} | {r['first'][rule]} | {j['first'][rule]} |"
            )
        kept_real = sum(r["kept"])
        kept_articles = sum(k for k, a in zip(r["kept"], articles) if a)
        kept_junk = sum(j["kept"])
        by_kind = Counter(d["kind"] for d, k in zip(junk, j["kept"]) if k)
        print(
            f"\nkept: real {kept_real}/{len(real)} ({100 * kept_real / len(real):.1f}%; articles "
            f"{kept_articles}/{sum(articles)}), junk {kept_junk}/{len(junk)} "
            f"(removed {100 * (1 - kept_junk / len(junk)):.1f}%){'; junk kept: ' + str(dict(by_kind)) if by_kind else ''}"
        )


if __name__ == "__main__":
    main()

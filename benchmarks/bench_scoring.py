"""Score-stage speed: kumihimo's fastText scorer vs datatrove's FastTextClassifierFilter, and an hf model.

    python benchmarks/bench_scoring.py --docs /work/peers/ja-docs [--max-docs 3000] [--hf-docs 64]

Real Japanese text: the Debian documentation pages of benchmarks/quality_calibration.py (GIMP,
LibreOffice and LilyPond help; see its docstring for how to unpack them) as "real", and the junk it
makes from them as "junk". A character n-gram fastText model is trained on both with
`kumihimo data train-classifier`'s code, then every document is scored in one process by
  - kumihimo: the score stage's scorer (segmentation + one batched predict per 256 documents, as the
    shard stage calls it), from the raw text;
  - datatrove: FastTextClassifierFilter(filter_mode=DOCUMENT).filter(Document) on the same model, one
    document at a time, given the text already segmented (datatrove has no segmentation step, so the
    model gets the input it was trained on; the segmentation cost is left out of datatrove's time).
Agreement: every document's probability of "real" from both, to 1e-6 (kumihimo stores 6 decimals).
Speed: documents per CPU second (time.process_time: one thread, so the figure is per core and holds on
a machine shared with other work), best of --repeat runs. `--hf-docs N` also times a randomly
initialised BERT-base-sized regression model (12 layers, 768 wide, 512 tokens: the shape of FineWeb-Edu's
classifier) on N documents on CPU with the score stage's hf scorer; its CPU seconds include every torch
thread's time. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality_calibration import junk_documents, real_documents  # noqa: E402

from kumihimo.data_prep.classifier import TrainSettings, train_classifier  # noqa: E402
from kumihimo.data_prep.config import ScoreConfig, ScorerConfig  # noqa: E402
from kumihimo.data_prep.scoring import load_scorers, score_texts  # noqa: E402

BATCH = 256  # the shard stage's batch of documents


def corpus(docs: Path, max_docs: int) -> list[dict]:
    real = real_documents(docs, "ja")
    if not real:
        raise SystemExit(f"no Japanese pages under {docs}; see benchmarks/quality_calibration.py")
    junk = junk_documents(real, "ja", per_kind=max(1, len(real) // 8))
    items = [{**d, "label": "real"} for d in real] + [{**d, "label": "junk"} for d in junk]
    random.Random(0).shuffle(items)
    return items[:max_docs]


def best_cpu_seconds(run, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.process_time()
        result = run()
        best = min(best, time.process_time() - start)
    return best, result


def kumihimo_scores(scorer, texts: list[str]) -> list[float]:
    scores: list[float] = []
    for start in range(0, len(texts), BATCH):
        scores += [s["score_q"] for s in score_texts([("score_q", scorer)], texts[start : start + BATCH])]
    return scores


def datatrove_scores(model_path: Path, segmented: list[str]) -> list[float]:
    from datatrove.data import Document
    from datatrove.pipeline.filters import FastTextClassifierFilter
    from fasttext.FastText import _FastText

    # datatrove checks for the distributions `fasteners` and `fasttext-numpy2-wheel`; this environment has
    # the same `fasttext` module from fasttext-community, and the download cache (the only user of
    # fasteners) is bypassed below, so the check is lifted for this one class
    FastTextClassifierFilter._requires_dependencies = []
    step = FastTextClassifierFilter(str(model_path), save_labels_in_metadata=True)
    # the `model` property would copy the file into datatrove's download cache first (and needs the
    # `fasteners` package for that); the predict path it then takes is this same _FastText object
    step._model = _FastText(str(model_path))
    scores = []
    for i, text in enumerate(segmented):
        doc = Document(text=text, id=str(i))
        step.filter(doc)
        scores.append(doc.metadata.get("__label__real", 0.0))
    return scores


def fasttext_comparison(items: list[dict], repeat: int) -> None:
    import json

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "labelled.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in items), encoding="utf-8")
        metrics = train_classifier(TrainSettings(inputs=[str(data)], output=f"{tmp}/model", epochs=5))
        f1 = {k: round(v["f1"], 3) for k, v in metrics["labels"].items()}
        model = Path(tmp) / "model" / "model.bin"
        (_, scorer), *_ = load_scorers(
            ScoreConfig(scorers=[ScorerConfig(name="q", path=str(model), label="real")])
        )
        texts = [d["text"] for d in items]
        segmented = [scorer.segment(t) for t in texts]
        ours_s, ours = best_cpu_seconds(lambda: kumihimo_scores(scorer, texts), repeat)
        theirs_s, theirs = best_cpu_seconds(lambda: datatrove_scores(model, segmented), repeat)
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    chars = sum(map(len, texts)) / len(texts)
    print(f"fastText: {len(texts)} Japanese documents (mean {chars:.0f} characters), held-out F1 {f1}")
    print(f"  agreement: max |kumihimo - datatrove| = {worst:.2e} ({'OK' if worst <= 1e-6 else 'DIFFERENT'})")
    print(
        f"  kumihimo  (raw text, incl. segmentation): {len(texts) / ours_s:8.0f} docs/CPU-s ({ours_s:.2f} s)"
    )
    print(
        f"  datatrove (pre-segmented text):           {len(texts) / theirs_s:8.0f} docs/CPU-s ({theirs_s:.2f} s)"
    )
    print(f"  ratio kumihimo / datatrove: {theirs_s / ours_s:.2f}x")


def hf_speed(items: list[dict], num_docs: int) -> None:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    texts = [d["text"] for d in items[:num_docs]]
    with tempfile.TemporaryDirectory() as tmp:
        chars = sorted({c for t in texts for c in t if not c.isspace()})
        (Path(tmp) / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars]) + "\n"
        )
        BertTokenizerFast(vocab_file=f"{tmp}/vocab.txt").save_pretrained(tmp)
        torch.manual_seed(0)
        config = BertConfig(vocab_size=len(chars) + 5, max_position_embeddings=512, num_labels=1)
        BertForSequenceClassification(config).save_pretrained(tmp)
        scorer_config = ScorerConfig(name="edu", kind="hf", path=tmp, device="cpu", batch_size=16)
        (_, scorer), *_ = load_scorers(ScoreConfig(scorers=[scorer_config]))
        seconds, _ = best_cpu_seconds(lambda: scorer.score(texts), 1)
        wall_start = time.perf_counter()
        scorer.score(texts)
        wall = time.perf_counter() - wall_start
    print(
        f"hf (BERT-base shape, 512 tokens, batch 16, {torch.get_num_threads()} torch threads): "
        f"{len(texts) / seconds:.2f} docs/CPU-s, {len(texts) / wall:.2f} docs/s wall"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=Path, default=Path("/work/peers/ja-docs"))
    parser.add_argument("--max-docs", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hf-docs", type=int, default=0, help="also time an hf model on this many documents")
    args = parser.parse_args()
    items = corpus(args.docs, args.max_docs)
    fasttext_comparison(items, args.repeat)
    if args.hf_docs:
        hf_speed(items, args.hf_docs)


if __name__ == "__main__":
    main()

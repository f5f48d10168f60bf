"""`kumihimo data train-classifier`: a fastText quality classifier for Japanese, trained from labelled JSONL.

Teams pick their best data with a fast classifier (Swallow Corpus v2's education-value classifier, the
FineWeb-Edu recipe): "good" = a reference corpus, "other" = random web, or graded labels. Japanese has
no spaces, so fastText's words would be whole sentences; the text is segmented deterministically first
(`segment`): one token per character (whitespace runs become "▁"), or the pieces of a SentencePiece
model when one is given. fastText's word n-grams then are character (or piece) n-grams. The scorer
(`scoring.py`) segments with the same settings, which are saved beside the model in classifier.json.

The output folder holds model.bin, classifier.json (segmentation, labels), metrics.json (held-out
precision/recall/F1 per label) and, with SentencePiece, segmenter.model.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kumihimo.core.errors import UserError
from kumihimo.core.files import make_output_folder, write_text_atomic
from kumihimo.core.records import read_records

MODEL = "model.bin"
META = "classifier.json"
METRICS = "metrics.json"
SEGMENTER = "segmenter.model"
_WHITESPACE = re.compile(r"\s+")


def import_fasttext():
    """The fastText module, or a one-line error naming the extra that installs it."""
    try:
        import fasttext
    except ImportError:
        raise UserError(
            "fastText is not installed; install the classify extra: pip install -e '.[classify]' "
            "(or pip install fasttext-community)"
        ) from None
    return fasttext


def char_segment(text: str, max_chars: int) -> str:
    """One space-separated token per character of the first max_chars characters; whitespace runs -> "▁"."""
    text = _WHITESPACE.sub("▁", text[:max_chars].strip())
    return " ".join(text)


def make_segmenter(
    segmentation: str, max_chars: int, sentencepiece_model: str | None
) -> Callable[[str], str]:
    """text -> the space-separated tokens fastText sees (the same function at training and scoring)."""
    if segmentation == "char":
        return lambda text: char_segment(text, max_chars)
    if segmentation != "sentencepiece" or not sentencepiece_model:
        raise UserError(f"segmentation={segmentation!r} needs 'char' or 'sentencepiece' with a model file")
    import sentencepiece as spm

    try:
        processor = spm.SentencePieceProcessor(model_file=str(sentencepiece_model))
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"cannot load SentencePiece model {sentencepiece_model}: {exc}; pass the tokenizer.model written by "
            "`kumihimo tokenizer train`, or leave --sentencepiece out for characters"
        ) from None

    def pieces(text: str) -> str:
        return " ".join(processor.encode(_WHITESPACE.sub(" ", text[:max_chars].strip()), out_type=str))

    return pieces


@dataclass(kw_only=True)
class TrainSettings:
    """What `kumihimo data train-classifier` takes (its command-line options)."""

    inputs: list[str]
    output: str
    text_field: str = "text"
    label_field: str = "label"
    segmentation: str = "char"
    sentencepiece_model: str | None = None
    max_chars: int = 4000
    heldout_fraction: float = 0.1
    epochs: int = 10
    lr: float = 0.5
    word_ngrams: int = 3
    dim: int = 64
    min_count: int = 2
    seed: int = 0


def load_examples(settings: TrainSettings) -> list[tuple[str, str]]:
    """(label, text) of every record of the inputs, in file order; records without either are an error."""
    examples: list[tuple[str, str]] = []
    for path in settings.inputs:
        for position, record in read_records(path):
            label, text = record.get(settings.label_field), record.get(settings.text_field)
            if label is None or not isinstance(text, str):
                raise UserError(
                    f"{path}:{position} has no {settings.label_field!r} label or no {settings.text_field!r} "
                    "text; every record needs both (use --label-field / --text-field)"
                )
            examples.append((str(label).replace(" ", "_"), text))
    labels = {label for label, _ in examples}
    if len(labels) < 2:
        raise UserError(
            f"the inputs hold {len(examples)} records with labels {sorted(labels)}; need 2+ labels: add records "
            "of another label (e.g. random web text labelled other)"
        )
    return examples


def split_examples(examples: list, heldout_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the held-out share from the front (the same split for the same seed)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    num_heldout = max(1, round(len(examples) * heldout_fraction))
    heldout = [examples[i] for i in order[:num_heldout]]
    train = [examples[i] for i in order[num_heldout:]]
    if not train:
        raise UserError(
            f"{len(examples)} records leave nothing to train on after the held-out split; add records or "
            "lower --heldout-fraction"
        )
    return train, heldout


def precision_recall_f1(truth: list[str], predicted: list[str]) -> dict[str, dict[str, float]]:
    """Per label: precision, recall, F1 and support (the number of true examples)."""
    result = {}
    for label in sorted(set(truth)):
        tp = sum(t == label and p == label for t, p in zip(truth, predicted))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    return result


def train_classifier(settings: TrainSettings) -> dict[str, Any]:
    """Train, evaluate on the held-out split and write the output folder; returns the metrics."""
    if not 0.0 < settings.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction={settings.heldout_fraction} must be between 0 and 1")
    fasttext = import_fasttext()
    segment = make_segmenter(settings.segmentation, settings.max_chars, settings.sentencepiece_model)
    train, heldout = split_examples(load_examples(settings), settings.heldout_fraction, settings.seed)
    out = make_output_folder(settings.output, "--output")
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        train_file = Path(tmp) / "train.txt"
        with open(train_file, "w", encoding="utf-8") as handle:
            for label, text in train:
                handle.write(f"__label__{label} {segment(text)}\n")
        # thread=1: fastText's Hogwild updates make multi-threaded training depend on scheduling
        model = fasttext.train_supervised(
            input=str(train_file),
            epoch=settings.epochs,
            lr=settings.lr,
            wordNgrams=settings.word_ngrams,
            dim=settings.dim,
            minCount=settings.min_count,
            thread=1,
            seed=settings.seed,
            verbose=0,
        )
        model.save_model(str(Path(tmp) / MODEL))
        Path(tmp, MODEL).replace(out / MODEL)
    predicted = [
        labels[0].removeprefix("__label__") for labels in model.predict([segment(t) for _, t in heldout])[0]
    ]
    truth = [label for label, _ in heldout]
    metrics = {
        "num_train": len(train),
        "num_heldout": len(heldout),
        "accuracy": sum(t == p for t, p in zip(truth, predicted)) / len(truth),
        "labels": precision_recall_f1(truth, predicted),
    }
    meta = {
        "kind": "fasttext",
        "labels": [label.removeprefix("__label__") for label in model.get_labels()],
        "segmentation": settings.segmentation,
        "max_chars": settings.max_chars,
        "sentencepiece_model": SEGMENTER if settings.sentencepiece_model else None,
        "trained_with": {k: v for k, v in asdict(settings).items() if k not in ("output",)},
    }
    if settings.sentencepiece_model:
        shutil.copyfile(settings.sentencepiece_model, out / SEGMENTER)
    write_text_atomic(out / META, json.dumps(meta, ensure_ascii=False, indent=1))
    write_text_atomic(out / METRICS, json.dumps(metrics, indent=1))
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    lines = [
        f"held-out: {metrics['num_heldout']} documents (trained on {metrics['num_train']}), "
        f"accuracy {metrics['accuracy']:.3f}",
        f"{'label':<16} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}",
    ]
    for label, m in metrics["labels"].items():
        lines.append(
            f"{label:<16} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>7.3f} {m['support']:>8}"
        )
    return "\n".join(lines)

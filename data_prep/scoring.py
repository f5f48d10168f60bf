"""The score stage: named model scores stored in every kept document's attributes.

`score.scorers` lists models; each adds attributes["score_<name>"] (a float) to every candidate, so a
team can choose cut-offs later from the stored values instead of re-running the models. Two kinds:
- fasttext: a model.bin from `kumihimo data train-classifier`, segmented as it was trained (its
  classifier.json beside it; character tokens without one). CPU, one document at a time in C++.
- hf: a Hugging Face sequence-classification folder (an edu-classifier-style regression model with one
  output, or a classifier whose `label` probability is the score), batched on CUDA when present.

`check_scorers` validates every model file in the parent process before any shard is touched (a missing
or corrupt model is one line, not a traceback in every worker); `load_scorers` runs once per worker.
Scores are rounded to 6 decimals so that the stored JSON is stable and compact.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from kumihimo.core.errors import UserError
from kumihimo.data_prep import classifier
from kumihimo.data_prep.config import ScoreConfig, ScorerConfig

DIGITS = 6
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def attribute(scorer: ScorerConfig) -> str:
    return f"score_{scorer.name}"


def _where(scorer: ScorerConfig) -> str:
    return f"score scorer {scorer.name!r} (path={scorer.path})"


def _model_files(scorer: ScorerConfig) -> list[Path]:
    """The files whose bytes decide the scores (hashed into the run's fingerprint)."""
    path = Path(scorer.path)
    if scorer.kind == "fasttext":
        files = [path, path.parent / classifier.META, path.parent / classifier.SEGMENTER]
        return [f for f in files if f.is_file()]
    return sorted(f for f in path.iterdir() if f.is_file())


def fingerprint(config: ScoreConfig) -> list[dict[str, Any]]:
    """Each active scorer's settings and the SHA-256 of its model files: a changed model blocks a resume."""
    result = []
    for scorer in config.active:
        digest = hashlib.sha256()
        for file in _model_files(scorer):
            digest.update(file.name.encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        result.append({"name": scorer.name, "kind": scorer.kind, "sha256": digest.hexdigest()})
    return result


def _check_safetensors(path: Path) -> None:
    """The header of a .safetensors file parses (a truncated or overwritten file does not)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > path.stat().st_size - 8:
            raise ValueError(f"header says {size} bytes, the file has {path.stat().st_size - 8}")
        header = json.loads(handle.read(size))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + size + end != path.stat().st_size:
        raise ValueError(f"holds {path.stat().st_size} bytes, its header describes {8 + size + end}")


def check_scorers(config: ScoreConfig) -> None:
    """Every active model can be loaded: a one-line UserError naming the scorer before any work."""
    for scorer in config.active:
        path = Path(scorer.path)
        if scorer.kind == "fasttext":
            if not path.is_file():
                raise UserError(
                    f"{_where(scorer)}: no such model file (train one: kumihimo data train-classifier)"
                )
            _FastTextScorer(scorer)  # loading the file is its check (it is small and fast)
            continue
        if not (path / "config.json").is_file():
            raise UserError(f"{_where(scorer)}: not a Hugging Face model folder (no config.json)")
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
            weights = [path / name for name in _HF_WEIGHTS if (path / name).is_file()]
            if not weights:
                raise ValueError(f"has none of {', '.join(_HF_WEIGHTS)}")
            if weights[0].suffix == ".safetensors":
                _check_safetensors(weights[0])
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise UserError(f"{_where(scorer)}: the model is corrupt or unreadable: {exc}") from None


class _FastTextScorer:
    def __init__(self, scorer: ScorerConfig):
        fasttext = classifier.import_fasttext()
        path = Path(scorer.path)
        try:
            self.model = fasttext.load_model(str(path))
        except ValueError as exc:
            raise UserError(f"{_where(scorer)}: not a fastText model ({exc})") from None
        meta_file = path.parent / classifier.META
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
        segmenter_model = meta.get("sentencepiece_model")
        self.segment = classifier.make_segmenter(
            meta.get("segmentation", "char"),
            meta.get("max_chars", 4000),
            str(path.parent / segmenter_model) if segmenter_model else None,
        )
        labels = [label.removeprefix("__label__") for label in self.model.get_labels()]
        label = scorer.label or labels[0]
        if label not in labels:
            raise UserError(f"{_where(scorer)}: label={label!r} is not one of the model's labels {labels}")
        self.label = f"__label__{label}"

    def score(self, texts: list[str]) -> list[float]:
        labels, probabilities = self.model.predict([self.segment(t) for t in texts], k=-1)
        return [
            float(dict(zip(names, probs)).get(self.label, 0.0)) for names, probs in zip(labels, probabilities)
        ]


class _HfScorer:
    def __init__(self, scorer: ScorerConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        use_cuda = scorer.device == "cuda" or (scorer.device == "auto" and torch.cuda.is_available())
        if scorer.device == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{_where(scorer)}: device=cuda but no CUDA GPU is visible; use device=auto")
        self.device = torch.device("cuda" if use_cuda else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(scorer.path)
            model = AutoModelForSequenceClassification.from_pretrained(scorer.path)
        except (OSError, ValueError) as exc:
            raise UserError(f"{_where(scorer)}: cannot load the model: {exc}") from None
        self.model = model.eval().to(self.device)  # eval: no dropout, so scores are deterministic
        # never longer than the model's positions (RoBERTa-style models spend 2 on the padding offset)
        positions = getattr(model.config, "max_position_embeddings", None) or scorer.max_tokens
        positions -= 2 if "roberta" in model.config.model_type else 0
        self.batch_size = scorer.batch_size
        self.max_tokens = min(scorer.max_tokens, positions, self.tokenizer.model_max_length)
        num_labels = model.config.num_labels
        self.column = 0
        if num_labels > 1:
            names = [model.config.id2label[i] for i in range(num_labels)]
            label = scorer.label or names[-1]
            if label not in names:
                raise UserError(f"{_where(scorer)}: label={label!r} is not one of the model's labels {names}")
            self.column = names.index(label)
        self.softmax = num_labels > 1

    def score(self, texts: list[str]) -> list[float]:
        torch = self.torch
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                truncation=True,
                max_length=self.max_tokens,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            values = logits.softmax(-1)[:, self.column] if self.softmax else logits[:, 0]
            scores.extend(values.cpu().tolist())
        return scores


def load_scorers(config: ScoreConfig) -> list[tuple[str, Any]]:
    """(attribute name, scorer) of every active scorer; models are loaded here, once per worker."""
    kinds = {"fasttext": _FastTextScorer, "hf": _HfScorer}
    return [(attribute(s), kinds[s.kind](s)) for s in config.active]


def score_verdict(config: ScoreConfig, attributes: dict[str, Any]) -> tuple[str, str] | None:
    """The first scorer with a min_score that `attributes` fall below, as a quality verdict; None if none.
    A missing score raises KeyError (as a missing quality measurement does)."""
    for scorer in config.active:
        if scorer.min_score is not None:
            value = attributes[attribute(scorer)]
            if value < scorer.min_score:
                return f"low_score_{scorer.name}", f"{attribute(scorer)} {value:.3f} < {scorer.min_score}"
    return None


def score_texts(scorers: list[tuple[str, Any]], texts: list[str]) -> list[dict[str, float]]:
    """One {attribute: score} per text."""
    result: list[dict[str, float]] = [{} for _ in texts]
    if not texts:
        return result
    for name, scorer in scorers:
        for scores, value in zip(result, scorer.score(texts)):
            scores[name] = round(value, DIGITS)
    return result

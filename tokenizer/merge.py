"""Merge separately trained per-language vocabularies into one model, then re-estimate the scores.

llm-jp-tokenizer v3 was built this way: an English/code vocabulary and a Japanese one (plus others)
trained apart, their pieces united, and the scores re-estimated on mixed text so that pieces from
different models compete on one scale. Here:

1. the first model is the base: its special, byte and user-defined pieces keep their ids; normal
   pieces follow in base order, then each further model's pieces that are not yet present;
2. scores are re-estimated by hard EM: encode a sample of mixed text with the current model, count
   how often each piece is chosen (Viterbi), set score = log of its smoothed relative frequency, repeat;
3. if the union is larger than `vocab_size`, the least used multi-character pieces are dropped
   (single characters are kept so coverage never falls back to bytes);
4. scores are rounded to the same 1/16 grid as trained models, so the Hugging Face export stays exact.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from kumihimo.core.errors import UserError
from kumihimo.core.files import check_output_folder, owned_output_folder
from kumihimo.core.logs import stage_logger
from kumihimo.tokenizer.train import SCORE_QUANTUM

log = stage_logger("tokenizer merge")

OWN_NAMES = ("tokenizer.model", "tokenizer.vocab")
"""What a merge writes (a folder holding only these, from before OWNER_FILE, is a merge's)."""

NORMAL = model_pb2.ModelProto.SentencePiece.NORMAL
SMOOTHING = 0.5


def _load(path: Path) -> model_pb2.ModelProto:
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable SentencePiece model ({exc}); pass .model files") from exc
    if proto.trainer_spec.model_type != model_pb2.TrainerSpec.UNIGRAM:
        raise UserError(
            f"{path} is not a Unigram model; only Unigram vocabularies can be merged and re-scored"
        )
    return proto


def union_pieces(models: list[model_pb2.ModelProto]) -> model_pb2.ModelProto:
    """The base model with every other model's normal pieces appended (first occurrence wins)."""
    merged = model_pb2.ModelProto()
    merged.CopyFrom(models[0])
    present = {p.piece for p in merged.pieces}
    for other in models[1:]:
        for piece in other.pieces:
            if piece.type == NORMAL and piece.piece not in present:
                new = merged.pieces.add()
                new.piece, new.score, new.type = piece.piece, piece.score, NORMAL
                present.add(piece.piece)
    return merged


def _piece_counts(proto: model_pb2.ModelProto, texts: list[str]) -> Counter:
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    counts: Counter = Counter()
    for ids in processor.Encode(texts, out_type=int):
        counts.update(ids)
    return counts


def reestimate(proto: model_pb2.ModelProto, texts: list[str], iterations: int) -> Counter:
    """Hard-EM: scores <- log smoothed frequency of each normal piece in the Viterbi segmentation."""
    counts: Counter = Counter()
    for iteration in range(iterations):
        counts = _piece_counts(proto, texts)
        normal_ids = [i for i, p in enumerate(proto.pieces) if p.type == NORMAL]
        total = sum(counts[i] for i in normal_ids) + SMOOTHING * len(normal_ids)
        for i in normal_ids:
            proto.pieces[i].score = math.log((counts[i] + SMOOTHING) / total)
        log.info(
            f"re-estimation {iteration + 1}/{iterations}: "
            f"{sum(1 for i in normal_ids if counts[i])} of {len(normal_ids)} pieces used"
        )
    return counts


def prune(proto: model_pb2.ModelProto, counts: Counter, vocab_size: int) -> None:
    """Drop the least used multi-character normal pieces until the vocabulary has vocab_size pieces."""
    excess = len(proto.pieces) - vocab_size
    if excess <= 0:
        return
    candidates = sorted(
        (counts[i], proto.pieces[i].score, i)
        for i, p in enumerate(proto.pieces)
        if p.type == NORMAL and len(p.piece) > 1
    )
    if len(candidates) < excess:
        raise UserError(
            f"cannot shrink the merged vocabulary to {vocab_size}: only {len(candidates)} pieces "
            "are removable; raise --vocab-size"
        )
    drop = {i for _count, _score, i in candidates[:excess]}
    kept = [p for i, p in enumerate(proto.pieces) if i not in drop]
    del proto.pieces[:]
    proto.pieces.extend(kept)


def merge_models(
    model_paths: list[Path],
    texts: list[str],
    output_dir: Path,
    vocab_size: int | None = None,
    iterations: int = 3,
) -> Path:
    """Merge Unigram models, re-estimate on `texts`, write `<output_dir>/tokenizer.model` and `.vocab`."""
    if len(model_paths) < 2:
        raise UserError("merging needs at least two models (--base and one or more --add)")
    if not texts:
        raise UserError("no text to re-estimate scores on; pass --text files with mixed-language documents")
    check_output_folder(output_dir, "--output", "tokenizer merge", own_names=OWN_NAMES, inputs=model_paths)
    models = [_load(Path(p)) for p in model_paths]
    merged = union_pieces(models)
    log.info(f"{len(merged.pieces):,} pieces in the union of {len(models)} models")
    counts = reestimate(merged, texts, iterations)
    if vocab_size is not None:
        prune(merged, counts, vocab_size)
        reestimate(merged, texts, 1)
    for piece in merged.pieces:
        if piece.type == NORMAL:
            piece.score = round(piece.score / SCORE_QUANTUM) * SCORE_QUANTUM
    merged.trainer_spec.vocab_size = len(merged.pieces)
    model_path = Path(output_dir) / "tokenizer.model"
    with owned_output_folder(
        output_dir, "--output", "tokenizer merge", own_names=OWN_NAMES, inputs=model_paths
    ) as staging:
        (staging / model_path.name).write_bytes(merged.SerializeToString())
        vocab = "".join(f"{p.piece}\t{p.score:g}\n" for p in merged.pieces)
        (staging / "tokenizer.vocab").write_text(vocab, encoding="utf-8")
    log.info(f"wrote {model_path} ({len(merged.pieces):,} pieces)")
    return model_path

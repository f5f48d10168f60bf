"""Train a SentencePiece tokenizer from the curated JSONL corpus, as llm-jp-tokenizer v3 was built.

Flow: check the recipe and the output directory -> sample lines from every source by its ratio
(streaming, at most `input_sentence_size` lines in memory) -> check that the sample can support
the vocabulary -> train SentencePiece in a staging directory -> verify the model -> rename the
staging directory into place. Nothing is visible in `output_dir` until everything succeeded.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_model

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.files import check_output_folder, matching_files, owned_output_folder
from kumihimo.core.logs import stage_logger
from kumihimo.core.progress import Progress
from kumihimo.core.records import read_records
from kumihimo.tokenizer.config import NEWLINE, SourceConfig, TokenizerTrainConfig
from kumihimo.tokenizer.spm import MODEL_FILENAME

log = stage_logger("tokenizer")

VOCAB_FILENAME = "tokenizer.vocab"
CONFIG_FILENAME = "train_config.yaml"
STATS_FILENAME = "train_stats.json"
# SentencePiece's Unigram trainer indexes its suffix array with int32 unless told otherwise.
LARGE_CORPUS_BYTES = 1_500_000_000
NUM_STATS_SENTENCES = 2000
LINE_WITH_NEWLINES = re.compile(r"[^\n]+\n*|\n+")
# Unigram scores are rounded to multiples of this. SentencePiece adds scores in float32, so when two
# splits tie exactly (5+1 vs 1+5 spaces) rounding noise picks one, and Hugging Face (float64) may
# pick the other. With scores on a 1/16 grid the sums stay exact (below 2**20, i.e. ~100k tokens per
# text), both pick the first split found, and the exported HF tokenizer matches id for id. The
# rounding moves a score by at most 1/32 nats, which does not change what the model learned.
SCORE_QUANTUM = 1 / 16


@dataclass
class SourceSample:
    """What sampling one source produced."""

    name: str
    files: list[Path]
    quota: int
    num_documents: int = 0
    num_lines: int = 0
    sentences: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "num_files": len(self.files),
            "num_documents_read": self.num_documents,
            "num_lines_read": self.num_lines,
            "quota": self.quota,
            "num_sentences_sampled": len(self.sentences),
            "num_chars_sampled": sum(len(s) for s in self.sentences),
        }


# --------------------------------------------------------------------------------------------
# Reading the corpus
# --------------------------------------------------------------------------------------------


def match_files(config: TokenizerTrainConfig) -> dict[str, list[Path]]:
    """Expand every source's globs; a source with ratio > 0 that matches nothing is an error."""
    matched = {}
    for source in config.input.sources:
        name = source.name
        files: set[str] = set()
        for pattern in source.paths:
            files.update(matching_files(pattern, f"input.sources.{name}.paths"))
        if not files and source.ratio > 0:
            raise configtree.bad_value(
                f"input.sources.{name}.paths",
                source.paths,
                "matched no files",
                "check the glob patterns (relative paths start at the current directory)",
            )
        matched[name] = sorted(Path(f) for f in files)
    return matched


def iter_documents(path: Path, text_field: str, lang: str | None) -> Iterator[str]:
    """Texts of the records in `path` (JSONL, .jsonl.gz/.zst, Parquet or WARC, read by
    kumihimo.core.records); malformed input is an error, not skipped."""
    columns = [text_field] if lang is None else [text_field, "lang"]
    for position, record in read_records(str(path), columns=columns):
        where = f"{path}:{position}"
        if text_field not in record:
            raise UserError(
                f"{where} has no {text_field!r} field; set input.text_field to the key that holds the text"
            )
        if lang is not None and record.get("lang") != lang:
            continue
        text = record[text_field]
        if not isinstance(text, str):
            raise UserError(
                f"{where}: field {text_field!r} is a {type(text).__name__}, not a string; "
                "fix the data or point text_field at the text"
            )
        yield text


def split_sentences(text: str, max_bytes: int) -> Iterator[str]:
    """Training sentences of a document: its lines with their newlines (blank lines stay attached to
    the line before), so "\\n" is learned as a piece; long lines are cut to at most max_bytes."""
    for line in LINE_WITH_NEWLINES.findall(text):
        encoded = line.encode("utf-8")
        if len(encoded) <= max_bytes:
            yield line
            continue
        start = 0
        while start < len(encoded):
            end = min(start + max_bytes, len(encoded))
            while end < len(encoded) and (encoded[end] & 0xC0) == 0x80:  # not inside a UTF-8 character
                end -= 1
            yield encoded[start:end].decode("utf-8")
            start = end


def sample_source(
    sample: SourceSample, source: SourceConfig, config: TokenizerTrainConfig, progress: Progress
) -> None:
    """Fill `sample.sentences`: a uniform reservoir sample, or the first lines without shuffling."""
    rng = random.Random(f"{config.seed}:{sample.name}")
    reservoir = sample.sentences
    for path in sample.files:
        for text in iter_documents(path, config.input.text_field, source.lang):
            sample.num_documents += 1
            for sentence in split_sentences(text, config.max_sentence_length):
                if len(reservoir) >= sample.quota and not config.shuffle_input_sentence:
                    return
                sample.num_lines += 1
                if len(reservoir) < sample.quota:
                    reservoir.append(sentence)
                else:
                    slot = rng.randrange(sample.num_lines)
                    if slot < sample.quota:
                        reservoir[slot] = sentence
            progress.update()


def sample_corpus(config: TokenizerTrainConfig, files: dict[str, list[Path]]) -> list[SourceSample]:
    """Sample every source by its ratio, then even out sources that had fewer lines than their share."""
    total_ratio = sum(s.ratio for s in config.input.sources)
    samples = []
    with Progress("tokenizer", unit="documents read") as progress:
        for source in config.input.sources:
            name = source.name
            if source.ratio == 0:
                continue
            quota = max(1, round(config.input_sentence_size * source.ratio / total_ratio))
            sample = SourceSample(name, files[name], quota)
            sample_source(sample, source, config, progress)
            if not sample.sentences:
                lang = f", lang={source.lang!r}" if source.lang is not None else ""
                raise UserError(
                    f"source {name!r} yielded no text from {len(sample.files)} file(s) "
                    f"(text_field={config.input.text_field!r}{lang}); check input.sources.{name}.paths and its filters"
                )
            log.info(
                f"{name}: {sample.num_documents:,} documents, {sample.num_lines:,} lines read, "
                f"{len(sample.sentences):,} sampled (quota {quota:,})"
            )
            samples.append(sample)
    _balance_short_sources(samples, config)
    return samples


def _balance_short_sources(samples: list[SourceSample], config: TokenizerTrainConfig) -> None:
    scale = min(len(s.sentences) / s.quota for s in samples)
    if scale >= 1.0:
        return
    short = ", ".join(
        f"{s.name} ({len(s.sentences):,} of {s.quota:,})" for s in samples if len(s.sentences) < s.quota
    )
    if config.on_short_source == "keep":
        total = sum(len(s.sentences) for s in samples)
        shares = ", ".join(f"{s.name} {len(s.sentences) / total:.1%}" for s in samples)
        log.info(
            f"warning: short sources {short}; keeping all lines, so the shares are {shares} "
            "instead of the configured ratios (on_short_source=keep)"
        )
        return
    log.info(
        f"short sources {short}: scaling every source to {scale:.1%} of its quota so the "
        "ratios hold (set on_short_source=keep to use all lines instead)"
    )
    for sample in samples:
        target = max(1, math.floor(sample.quota * scale))
        if len(sample.sentences) > target:
            rng = random.Random(f"{config.seed}:{sample.name}:scale")
            sample.sentences = rng.sample(sample.sentences, target)


# --------------------------------------------------------------------------------------------
# Checking that the data can support the vocabulary
# --------------------------------------------------------------------------------------------


def count_candidate_pieces(sentences: list[str], max_piece_length: int, limit: int) -> int:
    """Distinct substrings (<= max_piece_length chars, spaces attached to the following word) of the
    sample, counted up to `limit`. An upper bound on the pieces SentencePiece could learn, cheap
    because counting stops as soon as it reaches `limit`."""
    seen: set[str] = set()
    for sentence in sentences:
        for word in re.findall(r" *[^ ]+| +", sentence):
            for start in range(len(word)):
                for end in range(start + 1, min(start + max_piece_length, len(word)) + 1):
                    seen.add(word[start:end])
            if len(seen) >= limit:
                return len(seen)
    return len(seen)


def check_vocab_supported(config: TokenizerTrainConfig, sentences: list[str]) -> None:
    needed = config.padded_vocab_size - config.num_fixed_pieces()
    found = count_candidate_pieces(sentences, config.max_piece_length, needed)
    if found < needed:
        most = found + config.num_fixed_pieces()
        raise configtree.bad_value(
            "vocab_size",
            config.vocab_size,
            f"is more than the sampled corpus can support ({len(sentences):,} sentences hold at most "
            f"{most:,} distinct pieces including the {config.num_fixed_pieces()} fixed ones)",
            f"lower vocab_size well below {most:,} or add more text",
        )


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def sentencepiece_options(config: TokenizerTrainConfig, num_bytes: int) -> dict[str, Any]:
    """Trainer flags, recorded in train_stats.json so a run can be reproduced outside kumihimo."""
    specials = config.special_tokens
    has_pad = specials.pad is not None
    return {
        "model_type": config.model_type,
        "vocab_size": config.padded_vocab_size,
        "character_coverage": config.character_coverage,
        "max_sentence_length": config.max_sentence_length,
        "byte_fallback": config.byte_fallback,
        "split_digits": config.split_digits,
        "normalization_rule_name": config.normalization,
        "remove_extra_whitespaces": config.remove_extra_whitespaces,
        "add_dummy_prefix": config.add_dummy_prefix,
        "allow_whitespace_only_pieces": config.allow_whitespace_only_pieces,
        "max_sentencepiece_length": config.max_piece_length,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": 3 if has_pad else -1,
        "unk_piece": specials.unk,
        "bos_piece": specials.bos,
        "eos_piece": specials.eos,
        "pad_piece": specials.pad if has_pad else "<pad>",
        "control_symbols": specials.pieces()[4 if has_pad else 3 :],
        "user_defined_symbols": config.user_defined_pieces(),
        "required_chars": config.required_chars(),
        "train_extremely_large_corpus": num_bytes > LARGE_CORPUS_BYTES,
        "num_threads": config.num_threads or os.cpu_count() or 1,
        "minloglevel": 0 if config.log_sentencepiece else 2,
    }


def run_sentencepiece(
    options: dict[str, Any], sentences: list[str], model_prefix: Path, config: TokenizerTrainConfig
) -> None:
    """Train, turning SentencePiece's size complaints into errors that name the recipe key."""
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=str(model_prefix), **options
        )
    except RuntimeError as exc:
        message = str(exc)
        too_high = re.search(r"Vocabulary size too high \((\d+)\).*?<= (\d+)", message)
        if too_high:
            supported = int(too_high.group(2))
            multiple = config.pad_vocab_to_multiple_of or 1
            raise configtree.bad_value(
                "vocab_size",
                config.vocab_size,
                f"is more than SentencePiece can learn from the sample (at most {supported:,} pieces; "
                f"{config.padded_vocab_size:,} after padding)",
                f"set vocab_size <= {supported // multiple * multiple:,} or add more text",
            ) from exc
        too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
        if too_small:
            raise configtree.bad_value(
                "vocab_size",
                config.vocab_size,
                f"is smaller than the {int(too_small.group(2)):,} characters and fixed pieces that "
                f"character_coverage={config.character_coverage} keeps",
                "raise vocab_size or lower character_coverage",
            ) from exc
        raise UserError(
            f"SentencePiece training failed: {message.splitlines()[0]}; "
            "check the tokenizer recipe (set log_sentencepiece=true for details)"
        ) from exc


def quantize_scores(model_path: Path) -> None:
    """Round Unigram piece scores to SCORE_QUANTUM (see there) and rewrite the model."""
    proto = sp_model.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    if proto.trainer_spec.model_type != sp_model.TrainerSpec.UNIGRAM:
        return  # BPE scores are integer ranks already
    for piece in proto.pieces:
        piece.score = round(piece.score / SCORE_QUANTUM) * SCORE_QUANTUM
    model_path.write_bytes(proto.SerializeToString())


def verify_model(model_path: Path, config: TokenizerTrainConfig) -> spm.SentencePieceProcessor:
    """The model must have the special ids the rest of kumihimo relies on and keep newlines."""
    processor = spm.SentencePieceProcessor(model_file=str(model_path))
    expected = dict(enumerate(config.special_tokens.pieces()))
    actual = {i: processor.IdToPiece(i) for i in expected}
    assert actual == expected, f"special pieces out of place: {actual} != {expected}"
    assert processor.GetPieceSize() == config.padded_vocab_size, processor.GetPieceSize()
    lossless = (
        config.byte_fallback and config.normalization == "identity" and not config.remove_extra_whitespaces
    )
    probe = "def f():\n\tif x:\n        return 1\n\n日本語  テキスト 𩸽"
    if lossless:
        assert processor.DecodeIds(processor.EncodeAsIds(probe)) == probe, "round trip lost text"
    if config.newline_piece:
        assert processor.EncodeAsPieces(NEWLINE) == [NEWLINE], "newline is not a piece"
    return processor


def sample_stats(processor: spm.SentencePieceProcessor, samples: list[SourceSample]) -> dict[str, Any]:
    """Characters per token on (the start of) each source's training sample: a quick sanity figure."""
    stats = {}
    for sample in samples:
        head = sample.sentences[:NUM_STATS_SENTENCES]
        num_tokens = sum(len(ids) for ids in processor.Encode(head, out_type=int))
        num_chars = sum(len(s) for s in head)
        stats[sample.name] = round(num_chars / max(num_tokens, 1), 3)
    return stats


OWN_NAMES = (MODEL_FILENAME, VOCAB_FILENAME, CONFIG_FILENAME, STATS_FILENAME)
"""What training writes into output_dir (a folder holding only these, from before OWNER_FILE, is ours)."""


def output_rules(config: TokenizerTrainConfig) -> dict[str, Any]:
    """How `owned_output_folder` treats output_dir: replaced whole (with `overwrite`) when it holds a
    tokenizer this command trained; refused when it holds anything else (issue 23: the whole folder,
    user files included, used to be deleted)."""
    return dict(
        key="output_dir",
        written_by="tokenizer train",
        replace=config.overwrite,
        replace_hint="pass overwrite=true to replace the tokenizer in it",
        own_names=OWN_NAMES,
    )


def train_tokenizer(config: TokenizerTrainConfig) -> Path:
    """Train per `config`; returns the path of `<output_dir>/tokenizer.model`."""
    output_dir = Path(config.output_dir)
    check_output_folder(output_dir, **output_rules(config), inputs=())
    files = match_files(config)
    started = time.monotonic()
    samples = sample_corpus(config, files)
    sentences = [s for sample in samples for s in sample.sentences]
    if config.shuffle_input_sentence:
        random.Random(config.seed).shuffle(sentences)
    num_bytes = sum(len(s.encode("utf-8")) for s in sentences)
    check_vocab_supported(config, sentences)
    options = sentencepiece_options(config, num_bytes)
    inputs = [f for paths in files.values() for f in paths]
    with owned_output_folder(output_dir, **output_rules(config), inputs=inputs) as staging:
        log.info(
            f"training {config.model_type} vocab {config.padded_vocab_size:,} on "
            f"{len(sentences):,} sentences ({num_bytes / 1e6:,.1f} MB)"
        )
        sampled_at = time.monotonic()
        run_sentencepiece(options, sentences, staging / Path(MODEL_FILENAME).stem, config)
        trained_at = time.monotonic()
        quantize_scores(staging / MODEL_FILENAME)
        processor = verify_model(staging / MODEL_FILENAME, config)
        stats = {
            "vocab_size": processor.GetPieceSize(),
            "requested_vocab_size": config.vocab_size,
            "num_sentences": len(sentences),
            "num_bytes": num_bytes,
            "sources": {s.name: s.summary() for s in samples},
            "chars_per_token_on_sample": sample_stats(processor, samples),
            "seconds_sampling": round(sampled_at - started, 2),
            "seconds_training": round(trained_at - sampled_at, 2),
            "sentencepiece_options": options,
        }
        configtree.save(config, staging / CONFIG_FILENAME)
        (staging / STATS_FILENAME).write_text(
            json.dumps(stats, ensure_ascii=False, indent=2), encoding="utf-8"
        )
    log.info(
        f"wrote {output_dir / MODEL_FILENAME} ({stats['vocab_size']:,} pieces) in "
        f"{time.monotonic() - started:,.1f} s"
    )
    return output_dir / MODEL_FILENAME


def read_stats(output_dir: str | Path) -> dict[str, Any]:
    """The train_stats.json written beside a trained tokenizer."""
    return json.loads((Path(output_dir) / STATS_FILENAME).read_text(encoding="utf-8"))

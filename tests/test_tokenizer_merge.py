"""Merging per-language Unigram vocabularies with re-estimated scores (llm-jp-tokenizer v3 style)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.tokenizer import synthetic
from kumihimo.tokenizer.config import TokenizerTrainConfig
from kumihimo.tokenizer.export_hf import export_hf
from kumihimo.tokenizer.merge import merge_models
from kumihimo.tokenizer.train import train_tokenizer


def read_texts(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def train_one(path: Path, output: Path, vocab_size: int) -> Path:
    config = configtree.from_dict(
        TokenizerTrainConfig,
        {
            "input": {"sources": [{"name": "only", "paths": [str(path)], "ratio": 1.0}]},
            "output_dir": str(output),
            "vocab_size": vocab_size,
            "input_sentence_size": 3000,
            "num_threads": 2,
        },
    )
    configtree.validate_tree(config)
    return train_tokenizer(config)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    ja = synthetic.write_jsonl(root / "ja.jsonl.gz", "ja", 1200)
    en = synthetic.write_jsonl(root / "en.jsonl.gz", "en", 1200, seed=1)
    return {
        "ja_text": ja,
        "en_text": en,
        "ja": train_one(ja, root / "ja", 512),
        "en": train_one(en, root / "en", 512),
        "root": root,
    }


def chars_per_token(model: Path, texts: list[str]) -> float:
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return sum(map(len, texts)) / sum(len(ids) for ids in sp.Encode(texts))


def test_merged_model_keeps_ids_and_serves_both_languages(models):
    ja_texts, en_texts = read_texts(models["ja_text"]), read_texts(models["en_text"])
    merged = merge_models(
        [models["en"], models["ja"]], ja_texts[:600] + en_texts[:600], models["root"] / "merged"
    )
    base = spm.SentencePieceProcessor(model_file=str(models["en"]))
    other = spm.SentencePieceProcessor(model_file=str(models["ja"]))
    sp = spm.SentencePieceProcessor(model_file=str(merged))
    # Special and byte pieces keep the base model's ids; nothing of either model is lost.
    for i in range(base.GetPieceSize()):
        if base.IsControl(i) or base.IsUnknown(i) or base.IsByte(i):
            assert sp.IdToPiece(i) == base.IdToPiece(i)
    pieces = {sp.IdToPiece(i) for i in range(sp.GetPieceSize())}
    assert {base.IdToPiece(i) for i in range(base.GetPieceSize())} <= pieces
    assert {other.IdToPiece(i) for i in range(other.GetPieceSize())} <= pieces
    # On held-out text each language compresses at least as well as its own model did (within 2%).
    for lang_model, texts in ((models["ja"], ja_texts[600:]), (models["en"], en_texts[600:])):
        assert chars_per_token(merged, texts) >= 0.98 * chars_per_token(lang_model, texts)
    # And far better than the model trained on the other language.
    assert chars_per_token(merged, ja_texts[600:]) > 1.3 * chars_per_token(models["en"], ja_texts[600:])
    # Round trip and exact HF parity hold for the merged model.
    sample = ja_texts[600:650] + en_texts[600:650]
    assert [sp.DecodeIds(sp.EncodeAsIds(t)) for t in sample] == sample
    hf = AutoTokenizer.from_pretrained(export_hf(merged, models["root"] / "merged-hf"))
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in sample] == sp.Encode(sample)


def test_pruning_reaches_the_vocab_size(models):
    texts = read_texts(models["ja_text"])[:300] + read_texts(models["en_text"])[:300]
    union = merge_models([models["en"], models["ja"]], texts, models["root"] / "union")
    assert spm.SentencePieceProcessor(model_file=str(union)).GetPieceSize() > 600
    merged = merge_models([models["en"], models["ja"]], texts, models["root"] / "pruned", vocab_size=600)
    sp = spm.SentencePieceProcessor(model_file=str(merged))
    assert sp.GetPieceSize() == 600
    assert [sp.DecodeIds(sp.EncodeAsIds(t)) for t in texts[:20]] == texts[:20]


def test_merge_errors(models, tmp_path):
    with pytest.raises(UserError, match="at least two models"):
        merge_models([models["en"]], ["x"], tmp_path)
    with pytest.raises(UserError, match="no text to re-estimate"):
        merge_models([models["en"], models["ja"]], [], tmp_path)
    with pytest.raises(UserError, match="cannot shrink"):
        merge_models([models["en"], models["ja"]], ["テスト text"], tmp_path, vocab_size=10)

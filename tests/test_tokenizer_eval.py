"""Tokenizer evaluation: figures checked on texts whose answer is known by construction."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import sentencepiece as spm

from kumihimo.core.errors import UserError
from kumihimo.tokenizer import synthetic
from kumihimo.tokenizer.base import load_tokenizer
from kumihimo.tokenizer.cli import register
from kumihimo.tokenizer.evaluate import PIECE_CLASSES, classify_piece, evaluate, format_table, parse_text_spec

RARE = "ꙮ"  # U+A66E, 3 UTF-8 bytes, never in the training text


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-models")
    lines = [
        line
        for lang in ("ja", "en")
        for doc in synthetic.documents(lang, 400)
        for line in doc.split("\n")
        if line
    ]
    common = {
        "vocab_size": 600,
        "model_type": "unigram",
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "minloglevel": 2,
        "required_chars": "\n",
        "control_symbols": ["<mask>"],
        "pad_id": 3,
    }
    paths = {}
    for name, byte_fallback in (("bytes", True), ("unk", False)):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(root / name),
            byte_fallback=byte_fallback,
            **common,
        )
        paths[name] = root / f"{name}.model"
    return paths


@pytest.fixture()
def rare_text(tmp_path) -> Path:
    path = tmp_path / "rare.txt"
    path.write_text(f"{RARE}\n" * 10, encoding="utf-8")
    return path


def test_rates_on_a_text_with_a_known_answer(models, rare_text, tmp_path):
    for path in models.values():
        assert load_tokenizer(path).sp.PieceToId(RARE) == 0  # precondition: not in the vocabulary
    report = evaluate([str(models["bytes"]), str(models["unk"])], [f"{rare_text}:rare"])
    with_bytes, with_unk = (t["texts"]["rare"] for t in report["tokenizers"])
    # byte fallback: each line is 3 byte pieces + "\n" -> 20 chars in 40 tokens, 30 of them bytes
    assert (with_bytes["num_chars"], with_bytes["num_tokens"], with_bytes["num_byte_tokens"]) == (20, 40, 30)
    assert with_bytes["chars_per_token"] == 0.5 and with_bytes["byte_fallback_rate"] == 0.75
    assert with_bytes["unk_rate"] == 0.0
    # without byte fallback: <unk> + "\n" per line
    assert (with_unk["num_tokens"], with_unk["unk_rate"], with_unk["byte_fallback_rate"]) == (20, 0.5, 0.0)


def test_languages_pool_files_and_read_jsonl(models, tmp_path):
    jsonl = synthetic.write_jsonl(tmp_path / "ja.jsonl.gz", "ja", 30)
    texts = [doc for doc in synthetic.documents("ja", 30)]
    plain = tmp_path / "more.txt"
    plain.write_text("日本\n", encoding="utf-8")
    report = evaluate([str(models["bytes"])], [f"{jsonl}:ja", f"{plain}:ja"], max_documents=None)
    stats = report["tokenizers"][0]["texts"]["ja"]
    tokenizer = load_tokenizer(models["bytes"])
    expected_tokens = sum(len(tokenizer.encode(t)) for t in texts) + len(tokenizer.encode("日本\n"))
    assert stats["num_documents"] == 31
    assert stats["num_chars"] == sum(len(t) for t in texts) + 3
    assert stats["num_tokens"] == expected_tokens
    limited = evaluate([str(models["bytes"])], [f"{jsonl}:ja"], max_documents=5)
    assert limited["tokenizers"][0]["texts"]["ja"]["num_documents"] == 5


def test_vocab_composition_adds_up(models):
    report = evaluate([str(models["bytes"])], [])
    composition = report["tokenizers"][0]["composition"]
    assert set(composition) == set(PIECE_CLASSES)
    assert sum(composition.values()) == 600
    assert composition["byte"] == 256
    assert composition["special"] == 5  # <unk> <s> </s> <pad> <mask>
    assert composition["japanese"] > 0 and composition["latin"] > 0


@pytest.mark.parametrize(
    ("piece", "expected"),
    [
        ("▁▁▁▁", "whitespace"),
        ("\n", "whitespace"),
        ("日本", "japanese"),
        ("▁東京", "japanese"),
        ("ですか", "japanese"),
        ("カタカナ", "japanese"),
        ("。", "japanese"),
        ("𠮷", "japanese"),
        ("▁the", "latin"),
        ("ing", "latin"),
        ("7", "digit"),
        ("):", "code"),
        ("▁=", "code"),
        ("_name", "code"),
        ("😀", "other"),
        ("é", "other"),
        ("한국", "other"),
    ],
)
def test_classify_piece(piece, expected):
    assert classify_piece(piece) == expected


def test_text_spec_parsing(tmp_path):
    path = tmp_path / "data.en.jsonl"
    path.write_text("{}", encoding="utf-8")
    assert parse_text_spec(f"{path}:english") == (path, "english")
    assert parse_text_spec(str(path)) == (path, "data")
    with pytest.raises(UserError, match="does not exist"):
        parse_text_spec(f"{tmp_path}/missing.txt:ja")


def test_bad_inputs_are_user_errors(models, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2 has no string field 'text'"):
        evaluate([str(models["bytes"])], [str(bad)])
    with pytest.raises(UserError, match="no tokenizer given"):
        evaluate([], [str(bad)])


def test_cli_prints_table_and_writes_json(models, rare_text, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser)
    out = tmp_path / "report.json"
    args = parser.parse_args(
        [
            "eval",
            "--tokenizer",
            str(models["bytes"]),
            "--tokenizer",
            str(models["unk"]),
            "--text",
            f"{rare_text}:rare",
            "--json",
            str(out),
        ]
    )
    assert args.handler(args) == 0
    table = capsys.readouterr().out
    assert "rare: chars/token" in table and "bytes.model" in table and "unk.model" in table
    rows = {line.split("  ")[0]: line.split() for line in table.splitlines()}
    assert rows["rare: chars/token"][-2:] == ["0.500", "1.000"]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["tokenizers"][1]["texts"]["rare"]["unk_rate"] == 0.5
    assert format_table(report) == table.rstrip("\n")

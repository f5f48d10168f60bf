"""Tokenizer training: recipe checks, sampling, the trained model's properties, errors, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from kumihimo.core import configtree
from kumihimo.core.configtree import ConfigError
from kumihimo.core.errors import UserError
from kumihimo.core.files import OWNER_FILE
from kumihimo.tokenizer import synthetic
from kumihimo.tokenizer.base import load_tokenizer
from kumihimo.tokenizer.cli import register
from kumihimo.tokenizer.config import TokenizerTrainConfig
from kumihimo.tokenizer.train import (
    CONFIG_FILENAME,
    STATS_FILENAME,
    count_candidate_pieces,
    match_files,
    sample_corpus,
    split_sentences,
    train_tokenizer,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "tokenizer"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    synthetic.write_jsonl(root / "ja.jsonl.gz", "ja", 1500)
    synthetic.write_jsonl(root / "en.jsonl", "en", 1500)
    synthetic.write_jsonl(root / "code.jsonl.gz", "code", 300)
    return root


def named_sources(sources: dict[str, dict]) -> dict:
    """`input` with the sources {name: fields} as the list of named items the config reads."""
    return {"sources": [{"name": name, **fields} for name, fields in sources.items()]}


def recipe(corpus: Path, output_dir: Path, sources: dict | None = None, **overrides) -> dict:
    """A recipe dict; `sources` = per-source changes by name, merged into the three default sources."""
    by_name = {
        "ja": {"paths": [str(corpus / "ja.*")], "ratio": 0.5},
        "en": {"paths": [str(corpus / "en.*")], "ratio": 0.3},
        "code": {"paths": [str(corpus / "code.*")], "ratio": 0.2},
    }
    by_name = configtree.deep_merge(by_name, sources or {})
    data = {
        "input": named_sources(by_name),
        "output_dir": str(output_dir),
        "vocab_size": 1000,
        "input_sentence_size": 3000,
        "required_pieces": ["鰻", "言語モデル"],
        "special_tokens": {"num_reserved": 2},
        "num_threads": 2,
    }
    return configtree.deep_merge(data, overrides)


def make_config(data: dict) -> TokenizerTrainConfig:
    config = configtree.from_dict(TokenizerTrainConfig, data)
    configtree.validate_tree(config)
    return config


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("trained") / "tok"
    return train_tokenizer(make_config(recipe(corpus, output_dir)))


# ---------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------


def test_every_field_is_documented():
    assert configtree.check_documented(TokenizerTrainConfig) == []


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
def test_shipped_recipes_load_and_validate(name):
    config = configtree.load(TokenizerTrainConfig, CONFIG_DIR / name)
    assert config.padded_vocab_size % (config.pad_vocab_to_multiple_of or 1) == 0
    assert config.special_tokens.pieces()[:3] == ["<unk>", "<s>", "</s>"]


def test_llmjp3_recipe_matches_reference():
    config = configtree.load(TokenizerTrainConfig, CONFIG_DIR / "llmjp3-100k.yaml")
    assert config.padded_vocab_size == 99_584
    assert (config.model_type, config.normalization, config.max_piece_length) == ("unigram", "identity", 16)
    assert config.byte_fallback and config.split_digits and config.allow_whitespace_only_pieces
    assert not config.remove_extra_whitespaces and not config.add_dummy_prefix
    assert [source.name for source in config.input.sources] == ["ja", "en", "code"]


def test_quickstart_can_override_source_paths(tmp_path):
    config = configtree.load(
        TokenizerTrainConfig,
        CONFIG_DIR / "tiny.yaml",
        [f"input.sources.ja.paths=[{tmp_path}/a.jsonl]", f"output_dir={tmp_path}/out"],
    )
    assert config.input.sources[0].name == "ja" and config.input.sources[0].paths == [f"{tmp_path}/a.jsonl"]
    assert config.input.sources[1].paths == [
        "runs/quickstart/data_prep/curated/*.jsonl"
    ]  # the recipe is unchanged
    assert config.output_dir == f"{tmp_path}/out"


def test_old_sources_spelling_and_unknown_source_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'sources' is an old spelling; write input.sources as a list"):
        configtree.from_dict(TokenizerTrainConfig, {"sources": {"ja": {"paths": ["a"]}}, "output_dir": "o"})
    with pytest.raises(ConfigError, match=r"input.sources has no item named 'jp' \(names: ja, en\)"):
        configtree.load(TokenizerTrainConfig, CONFIG_DIR / "tiny.yaml", ["input.sources.jp.ratio=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"special_tokens": {"unk": ""}}, "special_tokens.unk=''"),
        ({"special_tokens": {"extra": ["<mask>", "<s>"]}}, "appears twice"),
        ({"special_tokens": {"pad": "<mask>"}}, "appears twice"),
        ({"sources": {"ja": {"ratio": 0}, "en": {"ratio": 0}, "code": {"ratio": 0}}}, "sum to 0"),
        ({"sources": {"ja": {"ratio": -1}}}, "input.sources.ja.ratio=-1.0"),
        ({"vocab_size": 200}, "leaves no room"),
        ({"character_coverage": 1.5}, "character_coverage=1.5"),
        ({"required_pieces": ["<s>"]}, "is also a special token"),
        ({"required_pieces": ["a b"]}, "contains whitespace"),
        ({"required_pieces_file": "/nonexistent/kanji.txt"}, "required_pieces_file"),
        ({"vocab_sise": 10}, "did you mean 'vocab_size'"),
    ],
)
def test_bad_recipes_are_refused_with_the_key(tmp_path, override, expected):
    data = recipe(tmp_path, tmp_path / "out", **override)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")) as info:
        make_config(data)
    assert "\n" not in str(info.value)


def test_vocab_is_padded_to_multiple(tmp_path):
    config = make_config(recipe(tmp_path, tmp_path / "o", vocab_size=1000, pad_vocab_to_multiple_of=128))
    assert config.padded_vocab_size == 1024
    config = make_config(recipe(tmp_path, tmp_path / "o", vocab_size=1000, pad_vocab_to_multiple_of=None))
    assert config.padded_vocab_size == 1000


def test_required_pieces_file_splits_chars_and_symbols(tmp_path):
    pieces = tmp_path / "kanji.txt"
    pieces.write_text("鰻\n鰯\r\n\n言語モデル\n鰻\n", encoding="utf-8")
    config = make_config(
        recipe(tmp_path, tmp_path / "o", required_pieces=[], required_pieces_file=str(pieces))
    )
    assert config.required_chars() == "\u2581\n鰻鰯"  # whitespace symbol and newline always
    assert config.user_defined_pieces() == ["言語モデル"]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_split_sentences_keeps_newlines_and_cuts_on_character_boundaries():
    text = "短い行\n\n" + "あ" * 10 + "\n  indented"
    assert list(split_sentences(text, max_bytes=100)) == ["短い行\n\n", "あ" * 10 + "\n", "  indented"]
    parts = list(split_sentences(text, max_bytes=7))  # "あ" is 3 bytes: 2 fit in 7 bytes
    assert parts[:2] == ["短い", "行\n\n"]  # cut at 6 bytes, not inside the third character
    assert parts[2:7] == ["ああ"] * 4 + ["ああ\n"]
    assert parts[-2:] == ["  inden", "ted"]
    assert "".join(parts) == text and all(len(p.encode()) <= 7 for p in parts)
    assert list(split_sentences("\n\nx", 100)) == ["\n\n", "x"]


def test_sampling_follows_ratios_and_is_deterministic(corpus, tmp_path):
    config = make_config(recipe(corpus, tmp_path / "o"))
    files = match_files(config)
    samples = sample_corpus(config, files)
    assert {s.name: len(s.sentences) for s in samples} == {"ja": 1500, "en": 900, "code": 600}
    again = sample_corpus(config, files)
    assert [s.sentences for s in samples] == [s.sentences for s in again]
    assert all(s and "\n" not in s.rstrip("\n") for sample in samples for s in sample.sentences)


def test_short_source_scales_down_others_or_keeps_all(corpus, tmp_path):
    data = recipe(corpus, tmp_path / "o", input_sentence_size=40_000)
    samples = {s.name: s for s in sample_corpus(make_config(data), match_files(make_config(data)))}
    num_ja = samples["ja"].num_lines  # ja has fewer lines than its 20,000 quota
    counts = {name: len(s.sentences) for name, s in samples.items()}
    assert counts["ja"] == num_ja and counts["en"] == int(12_000 * num_ja / 20_000)
    kept = sample_corpus(make_config({**data, "on_short_source": "keep"}), match_files(make_config(data)))
    assert {s.name: len(s.sentences) for s in kept} == {s.name: s.num_lines for s in kept}


def test_unshuffled_sampling_takes_the_first_lines(corpus, tmp_path):
    config = make_config(
        recipe(
            corpus,
            tmp_path / "o",
            shuffle_input_sentence=False,
            input_sentence_size=10,
            sources={"ja": {"ratio": 0}, "code": {"ratio": 0}},
        )
    )
    (sample,) = sample_corpus(config, match_files(config))
    first_doc = next(synthetic.documents("en", 1))
    assert sample.sentences[0] == first_doc.split("\n")[0] + "\n"[: "\n" in first_doc]
    assert sample.num_lines == 10


def test_lang_filter_selects_documents_of_a_mixed_file(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "\n".join(
            json.dumps({"text": t, "lang": lang}, ensure_ascii=False)
            for t, lang in [("日本語です", "ja"), ("English", "en")] * 3
        ),
        encoding="utf-8",
    )
    config = make_config(
        {
            "output_dir": str(tmp_path / "o"),
            "vocab_size": 2000,
            "input": named_sources(
                {"ja": {"paths": [str(mixed)], "lang": "ja"}, "en": {"paths": [str(mixed)], "lang": "en"}}
            ),
        }
    )
    samples = {s.name: {x.strip() for x in s.sentences} for s in sample_corpus(config, match_files(config))}
    assert samples == {"ja": {"日本語です"}, "en": {"English"}}


def test_candidate_piece_count_is_exact_on_a_small_case():
    # words "ab", " ab": substrings a, b, ab, " ", " a", " ab"
    assert count_candidate_pieces(["ab ab"], max_piece_length=16, limit=100) == 6
    assert count_candidate_pieces(["abcdef"], max_piece_length=2, limit=100) == 6 + 5
    assert count_candidate_pieces(["abcdef" * 100], max_piece_length=16, limit=3) >= 3


# ---------------------------------------------------------------------------------------------
# The trained model
# ---------------------------------------------------------------------------------------------


def test_training_writes_complete_output(trained):
    output_dir = trained.parent
    names = {p.name for p in output_dir.iterdir()}
    assert names == {"tokenizer.model", "tokenizer.vocab", CONFIG_FILENAME, STATS_FILENAME, OWNER_FILE}
    assert [p.name for p in output_dir.parent.iterdir()] == ["tok"]  # no staging directory left
    stats = json.loads((output_dir / STATS_FILENAME).read_text(encoding="utf-8"))
    assert stats["vocab_size"] == 1024 and stats["requested_vocab_size"] == 1000
    assert stats["sources"]["ja"]["num_sentences_sampled"] == 1500
    assert stats["chars_per_token_on_sample"]["ja"] > 1.0
    saved = yaml.safe_load((output_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    assert saved["vocab_size"] == 1000 and (
        saved["input"]["sources"][1]["name"],
        saved["input"]["sources"][1]["ratio"],
    ) == ("en", 0.3)


def test_special_ids_follow_llmjp_convention(trained):
    tokenizer = load_tokenizer(trained)
    assert tokenizer.vocab_size == 1024
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    assert tokenizer.eod_id == tokenizer.eos_id == 2
    assert [tokenizer.piece(i) for i in range(8)] == [
        "<unk>",
        "<s>",
        "</s>",
        "<pad>",
        "<mask>",
        "<eod>",
        "<reserved_0>",
        "<reserved_1>",
    ]
    assert tokenizer.sp.PieceToId("<eod>") == 5


def test_text_round_trips_with_newlines_indentation_and_rare_characters(trained):
    tokenizer = load_tokenizer(trained)
    newline_id = tokenizer.sp.PieceToId("\n")
    assert newline_id != tokenizer.unk_id and tokenizer.sp.EncodeAsPieces("x\ny") == ["x", "\n", "y"]
    texts = [
        "def f(x):\n    if x:\n\t\treturn  x\n\n",
        "  先頭の空白と　全角空白\n\n\n",
        "𠮷野家で𩸽 葛󠄀城 👨‍👩‍👧",
        "<s>literal</s>",
        "a" * 50 + " " * 17 + "end",
        "",
    ]
    for text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert not any(tokenizer.sp.IsByte(i) for i in ids if tokenizer.decode([i]) == "\n")
        assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_vocabulary_respects_the_recipe(trained):
    sp = load_tokenizer(trained).sp
    pieces = [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    normal = [p for i, p in enumerate(pieces) if not (sp.IsControl(i) or sp.IsByte(i) or sp.IsUnknown(i))]
    assert sum(sp.IsByte(i) for i in range(len(pieces))) == 256
    assert "鰻" in pieces  # required although absent from the corpus
    assert sp.EncodeAsPieces("言語モデルの研究")[0] == "言語モデル"
    assert not any(sum(c.isdigit() for c in p) > 1 for p in normal)  # split_digits
    assert max(len(p) for p in normal) <= 16
    assert any(len(p) > 1 and set(p) == {"▁"} for p in normal)  # whitespace-only pieces (indentation)
    assert not any(p.startswith("▁") and len(p) > 1 and "日" <= p[1] <= "鿿" for p in normal[:50])


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_no_matching_files(tmp_path):
    config = make_config(recipe(tmp_path, tmp_path / "o"))
    with pytest.raises(ConfigError, match=r"sources\.ja\.paths=.*matched no files"):
        train_tokenizer(config)


def test_empty_corpus(tmp_path):
    for name in ("ja", "en", "code"):
        (tmp_path / f"{name}.jsonl").write_text(
            json.dumps({"text": "", "lang": name}) + "\n", encoding="utf-8"
        )
    with pytest.raises(UserError, match="source 'ja' yielded no text from 1 file"):
        train_tokenizer(make_config(recipe(tmp_path, tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_malformed_json_names_file_and_line(tmp_path):
    for name in ("ja", "en", "code"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"ja\.jsonl:2 is not valid JSON"):
        train_tokenizer(make_config(recipe(tmp_path, tmp_path / "o")))


def test_vocab_too_large_is_caught_before_training(tmp_path):
    for name in ("ja", "en", "code"):
        (tmp_path / f"{name}.jsonl").write_text(
            json.dumps({"text": "同じ文です。 same line"}) + "\n" * 2, encoding="utf-8"
        )
    with pytest.raises(ConfigError, match=r"vocab_size=1000 is more than the sampled corpus can support"):
        train_tokenizer(make_config(recipe(tmp_path, tmp_path / "o")))


def test_sentencepiece_vocab_error_is_rephrased(tmp_path):
    synthetic.write_jsonl(tmp_path / "en.jsonl", "en", 150)
    data = recipe(
        tmp_path, tmp_path / "o", vocab_size=2000, sources={"ja": {"ratio": 0}, "code": {"ratio": 0}}
    )
    with pytest.raises(
        ConfigError, match=r"vocab_size=2000 is more than SentencePiece can learn.*set vocab_size <= \d"
    ):
        train_tokenizer(make_config(data))
    assert [p.name for p in tmp_path.iterdir()] == ["en.jsonl"]  # nothing left behind


def test_existing_output_is_kept_unless_overwrite(corpus, tmp_path):
    output_dir = tmp_path / "tok"
    output_dir.mkdir()
    (output_dir / "tokenizer.model").write_text("old", encoding="utf-8")
    with pytest.raises(UserError, match="already exists and is not empty; .*overwrite=true"):
        train_tokenizer(make_config(recipe(corpus, output_dir)))
    failing = recipe(corpus, output_dir, overwrite=True, vocab_size=60_000)
    with pytest.raises(ConfigError):
        train_tokenizer(make_config(failing))
    assert (output_dir / "tokenizer.model").read_text(encoding="utf-8") == "old"  # failure keeps the old one


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kumihimo tokenizer")
    register(parser)
    return parser


def test_cli_train_with_overrides(corpus, tmp_path, capsys):
    config_path = tmp_path / "recipe.yaml"
    config_path.write_text(
        yaml.safe_dump(recipe(corpus, tmp_path / "unused", vocab_size=640), allow_unicode=True),
        encoding="utf-8",
    )
    args = make_parser().parse_args(
        [
            "train",
            str(config_path),
            f"output_dir={tmp_path / 'cli'}",
            "input.sources.code.ratio=0",
            "model_type=bpe",
        ]
    )
    assert args.handler(args) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli" / "tokenizer.model")
    tokenizer = load_tokenizer(tmp_path / "cli")
    assert tokenizer.vocab_size == 640
    stats = json.loads((tmp_path / "cli" / STATS_FILENAME).read_text(encoding="utf-8"))
    assert set(stats["sources"]) == {"ja", "en"} and stats["sentencepiece_options"]["model_type"] == "bpe"


def test_cli_print_config_does_not_train(tmp_path, capsys):
    args = make_parser().parse_args(
        [
            "train",
            str(CONFIG_DIR / "tiny.yaml"),
            f"output_dir={tmp_path / 'x'}",
            "vocab_size=3000",
            "--print-config",
        ]
    )
    assert args.handler(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["vocab_size"] == 3000 and not (tmp_path / "x").exists()


def test_cli_bad_override_is_a_config_error(tmp_path):
    args = make_parser().parse_args(["train", str(CONFIG_DIR / "tiny.yaml"), "vocab_size=many"])
    with pytest.raises(ConfigError, match="vocab_size='many' is not an integer"):
        args.handler(args)


@pytest.mark.parametrize("command", ["train", "eval", "export-hf"])
def test_cli_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        make_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out

"""`kumihimo tokenizer ...`: train, evaluate and export tokenizers."""

from __future__ import annotations

import argparse

from kumihimo.core import configtree
from kumihimo.core.logs import stage_logger
from kumihimo.tokenizer.config import SourceConfig, TokenizerTrainConfig

log = stage_logger("tokenizer")

TRAIN_EXAMPLES = """examples:
  kumihimo tokenizer train configs/tokenizer/tiny.yaml
  kumihimo tokenizer train configs/tokenizer/llmjp3-100k.yaml output_dir=runs/tok input.sources.ja.ratio=0.6
  kumihimo tokenizer train configs/tokenizer/tiny.yaml 'input.sources.ja.paths=[data/ja/*.jsonl.gz]' --print-config

settings (dotted keys for overrides):
"""
EVAL_EXAMPLES = """examples:
  kumihimo tokenizer eval --tokenizer runs/tok/tokenizer.model --text ja.jsonl.gz:ja --text en.jsonl:en
  kumihimo tokenizer eval --tokenizer a.model --tokenizer b.model --text sample.txt:code --json report.json

A text is FILE[:LANG]: JSONL or JSONL.gz (the --text-field of every line) or plain UTF-8 text.
Several files with the same LANG are pooled. Characters per token counts Unicode characters;
rates are shares of all tokens."""
EXPORT_EXAMPLES = """examples:
  kumihimo tokenizer export-hf --tokenizer runs/tok/tokenizer.model --output runs/tok/hf

The directory loads offline with transformers.AutoTokenizer.from_pretrained(DIR) and gives the
same ids as SentencePiece; encode() prepends <s> (never </s>), as in training documents."""


def register(parser: argparse.ArgumentParser) -> None:
    """Add the tokenizer sub-commands to the `tokenizer` verb's parser."""
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    formatter = argparse.RawDescriptionHelpFormatter

    train = commands.add_parser(
        "train",
        help="train a SentencePiece tokenizer from a recipe",
        formatter_class=formatter,
        description="Sample sentences from the curated JSONL corpus by per-source ratios and train a "
        "SentencePiece tokenizer (llm-jp-tokenizer v3 style by default).",
        epilog=TRAIN_EXAMPLES + _settings_help(),
    )
    train.add_argument("config", help="tokenizer recipe (YAML), e.g. configs/tokenizer/tiny.yaml")
    train.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. vocab_size=8000")
    train.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    train.set_defaults(handler=run_train)

    evaluate = commands.add_parser(
        "eval",
        help="compare tokenizers on texts",
        formatter_class=formatter,
        description="Characters per token, byte-fallback and unknown rates per language, and the "
        "vocabulary composition, side by side for one or more tokenizers.",
        epilog=EVAL_EXAMPLES,
    )
    evaluate.add_argument(
        "--tokenizer",
        action="append",
        required=True,
        metavar="MODEL",
        help="SentencePiece .model (or a directory with tokenizer.model); repeatable",
    )
    evaluate.add_argument(
        "--text", action="append", required=True, metavar="FILE[:LANG]", help="text to measure on; repeatable"
    )
    evaluate.add_argument("--text-field", default="text", help="JSON key of the text in JSONL files")
    evaluate.add_argument(
        "--max-documents", type=int, default=None, metavar="N", help="read at most N documents per file"
    )
    evaluate.add_argument("--num-threads", type=int, default=1, help="encoding threads")
    evaluate.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    evaluate.set_defaults(handler=run_eval)

    export = commands.add_parser(
        "export-hf",
        help="write a Hugging Face tokenizer directory",
        formatter_class=formatter,
        description="Export a SentencePiece model as a Hugging Face fast tokenizer (tokenizer.json, "
        "tokenizer_config.json, special_tokens_map.json, tokenizer.model).",
        epilog=EXPORT_EXAMPLES,
    )
    export.add_argument("--tokenizer", required=True, metavar="MODEL", help="SentencePiece .model")
    export.add_argument("--output", required=True, metavar="DIR", help="output directory")
    export.set_defaults(handler=run_export)

    merge = commands.add_parser(
        "merge",
        help="merge per-language Unigram vocabularies and re-estimate their scores",
        description=(
            "Unite the pieces of separately trained Unigram models (the first keeps its special and "
            "byte ids), re-estimate every score by hard EM on mixed text, optionally prune to a "
            "vocabulary size: how llm-jp-tokenizer v3 combined its per-language vocabularies."
        ),
        epilog=(
            "example:\n  kumihimo tokenizer merge --base en/tokenizer.model --add ja/tokenizer.model \\\n"
            "      --text curated/en.jsonl --text curated/ja.jsonl --vocab-size 99584 --output merged/"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    merge.add_argument("--base", required=True, metavar="MODEL", help="model whose special/byte ids are kept")
    merge.add_argument("--add", action="append", required=True, metavar="MODEL", help="model to merge in")
    merge.add_argument(
        "--text",
        action="append",
        required=True,
        metavar="FILE",
        help="JSONL(.gz) with a text field, for re-estimating scores (repeatable)",
    )
    merge.add_argument("--text-field", default="text", help="JSON key of the text")
    merge.add_argument("--max-documents", type=int, default=20000, help="documents read per --text file")
    merge.add_argument("--vocab-size", type=int, default=None, help="prune the union to this many pieces")
    merge.add_argument("--iterations", type=int, default=3, help="hard-EM iterations")
    merge.add_argument("--output", required=True, metavar="DIR", help="output directory")
    merge.set_defaults(handler=run_merge)


def _settings_help() -> str:
    rows = configtree.describe(TokenizerTrainConfig)
    rows += configtree.describe(SourceConfig, "input.sources.<name>")
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"  {key.ljust(width)}  {doc}" for key, _, doc in rows)


def run_train(args: argparse.Namespace) -> int:
    from kumihimo.tokenizer.train import train_tokenizer  # sentencepiece training code only when training

    config = configtree.load(TokenizerTrainConfig, args.config, args.overrides)
    if args.print_config:
        print(configtree.dump_yaml(config), end="")
        return 0
    log.info("resolved recipe:\n" + configtree.dump_yaml(config).rstrip())
    model_path = train_tokenizer(config)
    print(model_path)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from kumihimo.tokenizer.evaluate import evaluate, format_table, write_report

    report = evaluate(
        args.tokenizer,
        args.text,
        text_field=args.text_field,
        max_documents=args.max_documents,
        num_threads=args.num_threads,
    )
    print(format_table(report))
    if args.json:
        write_report(report, args.json)
        log.info(f"wrote {args.json}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from kumihimo.tokenizer.export_hf import export_hf

    output_dir = export_hf(args.tokenizer, args.output)
    print(output_dir)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from itertools import islice
    from pathlib import Path

    from kumihimo.tokenizer.merge import merge_models
    from kumihimo.tokenizer.train import iter_documents

    texts = []
    for path in args.text:
        texts += islice(iter_documents(Path(path), args.text_field, None), args.max_documents)
    merge_models(
        [Path(args.base), *map(Path, args.add)], texts, Path(args.output), args.vocab_size, args.iterations
    )
    return 0

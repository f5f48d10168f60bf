"""`kumihimo data {curate,tokenize,run,refilter,train-classifier}`: the data_prep verb's sub-commands."""

from __future__ import annotations

import argparse

from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.data_prep.config import load_config

log = stage_logger("data_prep")
plain_log = stage_logger(None)
classifier_log = stage_logger("classifier")
tokenize_log = stage_logger("tokenize")

_EXAMPLES = {
    "curate": """examples:
  kumihimo data curate configs/data_prep/quickstart.yaml
  kumihimo data curate configs/data_prep/llmjp-web.yaml output_dir=/data/curated num_workers=64
  kumihimo data curate my.yaml 'input.sources=[{name: ja, paths: [raw/ja/*.jsonl.gz]}]' dedup.num_bands=40
  kumihimo data curate configs/data_prep/llmjp-web.yaml executor.kind=datatrove-slurm executor.tasks=512 \
      executor.slurm_partition=cpu 'executor.slurm_env_command=source ~/kumihimo/.venv/bin/activate'

A killed run resumes where it stopped when started again with the same config and output_dir.""",
    "tokenize": """examples:
  kumihimo data tokenize configs/data_prep/quickstart.yaml --tokenizer out/tokenizer/tokenizer.model
  kumihimo data tokenize my.yaml --tokenizer llm-jp-tokenizer/v3.model tokenize.add_bos=false
  kumihimo data tokenize my.yaml --tokenizer tok.model tokenize.tasks=64 executor.kind=datatrove-slurm \
      executor.slurm_partition=cpu

tokenize.tasks=N cuts the curated files into parts (tokenize.part_bytes) encoded by N tasks on executor.kind,
then merges them into the same bytes; a killed run resumes at its unfinished parts.

Writes <output_dir>/datasets/<source>_text_document.{bin,idx} and <output_dir>/blend.yaml (for data.blend_file).""",
    "refilter": """examples:
  kumihimo data curate configs/data_prep/llmjp-web.yaml output_dir=/data/c filters.refilterable=true
  kumihimo data refilter configs/data_prep/llmjp-web.yaml output_dir=/data/c filters.refilterable=true \
      filters.ja.min_hiragana_ratio=0.15 filters.ja.max_sentence_chars=300

Rewrites curated/, dropped/ and the report in output_dir; the previous config is kept as refiltered_from.yaml.""",
    "train-classifier": """examples:
  kumihimo data train-classifier --input good.jsonl other.jsonl --output out/edu-classifier
  kumihimo data train-classifier --input graded.jsonl.gz --label-field grade --output out/grades \
      --sentencepiece out/tokenizer/tokenizer.model

Every record needs a text and a label. Then score with it during curation:
  kumihimo data curate my.yaml 'score.scorers=[{name: edu, path: out/edu-classifier/model.bin, label: good}]'""",
    "run": """examples:
  kumihimo data run configs/data_prep/quickstart.yaml --tokenizer out/tokenizer/tokenizer.model
  kumihimo data run configs/data_prep/llmjp-web.yaml --tokenizer tok.model output_dir=/data/llmjp""",
}


class _OverridesParser(argparse.ArgumentParser):
    """Accepts `key=value` overrides after options too (`CONFIG --tokenizer M a=1`): plain argparse
    binds the empty override list before the option and then rejects the trailing ones."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if hasattr(namespace, "overrides"):
            late = [a for a in extras if "=" in a and not a.startswith("-")]
            namespace.overrides = [*(namespace.overrides or []), *late]
            extras = [a for a in extras if a not in late]
        return namespace, extras


def _add_common(sub: argparse.ArgumentParser, needs_tokenizer: bool) -> None:
    sub.add_argument("config", help="data_prep YAML recipe (see configs/data_prep/)")
    if needs_tokenizer:
        sub.add_argument(
            "--tokenizer",
            required=True,
            metavar="MODEL",
            help="SentencePiece .model file (or a directory holding tokenizer.model), or a Hugging Face "
            "tokenizer folder (tokenizer.json; encodes as Megatron's preprocess_data HuggingFaceTokenizer)",
        )
    sub.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted config overrides, e.g. num_workers=8 filters.ja.min_chars=200",
    )


def _curate(args: argparse.Namespace) -> int:
    from kumihimo.data_prep.pipeline import curate

    config = load_config(args.config, args.overrides)
    result = curate(config)
    if result is None:
        log.info(
            "Slurm jobs submitted; when they have finished, run this command again to print the "
            "result, and `kumihimo data tokenize` to build the datasets"
        )
        return 0
    log.info(
        f"kept {result.num_kept} of {result.num_input_lines} input lines "
        f"({result.num_dropped} dropped, {result.num_quarantined} quarantined); report: {result.report_path}"
    )
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from kumihimo.data_prep.tokenize_parts import tokenize

    config = load_config(args.config, args.overrides)
    result = tokenize(config, args.tokenizer)
    if result is None:
        tokenize_log.info(
            "Slurm jobs submitted; when they have finished, run this command again to print the result"
        )
        return 0
    for source, prefix in result.prefixes.items():
        tokenize_log.info(
            f"{source}: {result.num_documents[source]} documents, {result.num_tokens[source]} tokens "
            f"-> {prefix}"
        )
    tokenize_log.info(f"blend: {result.blend_path}")
    return 0


def _refilter(args: argparse.Namespace) -> int:
    from kumihimo.data_prep.pipeline import refilter

    result = refilter(load_config(args.config, _with_curated_scorers(args.config, args.overrides)))
    log.info(
        f"refiltered: kept {result.num_kept} of {result.num_input_lines} input lines "
        f"({result.num_dropped} dropped); report: {result.report_path}"
    )
    return 0


def _with_curated_scorers(recipe: str, overrides: list[str]) -> list[str]:
    """`score.scorers.edu.min_score=0.9` names a scorer; when the recipe lists none (the curation got its
    scorers as an override, `'score.scorers=[...]'`), take the list the curation saved in output_dir,
    so the keyed form changes that curation's scorer as documented."""
    import json
    from pathlib import Path

    import yaml

    keys = [item.partition("=")[0].strip() for item in overrides]
    keyed = [item for item, key in zip(overrides, keys, strict=True) if key.startswith("score.scorers.")]
    if not keyed or "score.scorers" in keys:
        return overrides
    rest = [item for item in overrides if item not in keyed]
    base = load_config(recipe, rest)
    if base.score.scorers:
        return overrides  # the recipe's own scorers: a name it lacks gets configtree's error
    saved = Path(base.output_dir) / "data_prep_config.yaml"
    scorers = (
        ((yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("score") or {}).get("scorers")
        if saved.is_file()
        else None
    )
    if not scorers:
        return overrides  # nothing to inherit: configtree says to give the whole list
    log.info(f"score.scorers from the curation's {saved} (the recipe lists none), then {' '.join(keyed)}")
    return [*rest, f"score.scorers={json.dumps(scorers, ensure_ascii=False)}", *keyed]


def _train_classifier(args: argparse.Namespace) -> int:
    from kumihimo.data_prep.classifier import TrainSettings, format_metrics, train_classifier

    settings = TrainSettings(
        inputs=args.input,
        output=args.output,
        text_field=args.text_field,
        label_field=args.label_field,
        segmentation="sentencepiece" if args.sentencepiece else "char",
        sentencepiece_model=args.sentencepiece,
        heldout_fraction=args.heldout_fraction,
        epochs=args.epochs,
        word_ngrams=args.word_ngrams,
        seed=args.seed,
    )
    metrics = train_classifier(settings)
    plain_log.info(format_metrics(metrics))
    classifier_log.info(f"model, classifier.json and metrics.json in {args.output}")
    return 0


def _add_classifier_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--input", nargs="+", required=True, metavar="FILE", help="labelled JSONL/Parquet files")
    sub.add_argument("--output", required=True, metavar="DIR", help="folder for model.bin and metrics.json")
    sub.add_argument("--text-field", default="text", metavar="F", help="the text's field (default: text)")
    sub.add_argument("--label-field", default="label", metavar="F", help="the label's field (default: label)")
    sub.add_argument(
        "--sentencepiece",
        metavar="MODEL",
        help="segment into this SentencePiece model's pieces (default: one token per character)",
    )
    sub.add_argument(
        "--heldout-fraction", type=float, default=0.1, metavar="X", help="share held out for P/R/F1"
    )
    sub.add_argument("--epochs", type=int, default=10, metavar="N", help="fastText epochs (default: 10)")
    sub.add_argument(
        "--word-ngrams", type=int, default=3, metavar="N", help="n-gram length over characters/pieces"
    )
    sub.add_argument("--seed", type=int, default=0, metavar="N", help="split and training seed")


def _run(args: argparse.Namespace) -> int:
    if load_config(args.config, args.overrides).executor.kind == "datatrove-slurm":
        raise UserError(
            "`kumihimo data run` cannot wait for Slurm jobs; run `kumihimo data curate` "
            "(it submits them), then `kumihimo data tokenize` once they have finished"
        )
    _curate(args)
    return _tokenize(args)


def register(parser: argparse.ArgumentParser) -> None:
    """Add curate / tokenize / run under the `data_prep` verb's parser."""
    subs = parser.add_subparsers(
        dest="data_prep_command",
        metavar="{curate,tokenize,run,refilter,train-classifier}",
        parser_class=_OverridesParser,
    )
    specs = [
        (
            "curate",
            _curate,
            False,
            "raw JSONL or Parquet -> curated JSONL (repair, langid, filters, dedup, PII, decontam)",
            "Read every source's JSONL or Parquet files, repair and filter it, deduplicate across sources, redact PII and drop "
            "documents overlapping evaluation data. Writes <output_dir>/curated/<source>.jsonl, dropped/, "
            "quarantine/, report.md and report.html.",
        ),
        (
            "tokenize",
            _tokenize,
            True,
            "curated JSONL -> Megatron .bin/.idx per source + blend.yaml",
            "Encode the curated documents with a SentencePiece model as [<s>] + ids + [</s>] into one Megatron "
            "indexed dataset per source and write blend.yaml with token-share weights.",
        ),
        ("run", _run, True, "curate, then tokenize", "Run curate and tokenize back to back."),
        (
            "refilter",
            _refilter,
            False,
            "apply other quality thresholds to a finished curation (no re-extraction or hashing)",
            "Re-decide the quality rules from the measurements stored with every document of a run curated "
            "with filters.refilterable=true, then deduplicate and merge again. Only thresholds may change.",
        ),
    ]
    classify = subs.add_parser(
        "train-classifier",
        help="labelled JSONL -> fastText quality classifier + held-out precision/recall/F1",
        description="Train a fastText classifier on character (or SentencePiece piece) n-grams of labelled "
        "documents, evaluate it on a held-out split and save model.bin, classifier.json and metrics.json. "
        "Use it as a score.scorers entry of kind fasttext.",
        epilog=_EXAMPLES["train-classifier"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_classifier_options(classify)
    classify.set_defaults(handler=_train_classifier)
    for name, handler, needs_tokenizer, summary, description in specs:
        sub = subs.add_parser(
            name,
            help=summary,
            description=description,
            epilog=_EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_common(sub, needs_tokenizer)
        sub.set_defaults(handler=handler)

"""`kumihimo <verb>`: one command line for the whole pipeline.

    kumihimo quickstart            the whole pipeline on the bundled sample corpus, on CPU
    kumihimo data ...              curate raw JSONL and build Megatron datasets + blend
    kumihimo tokenizer ...         train / evaluate / export a SentencePiece tokenizer
    kumihimo train CONFIG ...      pretrain with Megatron-Core (one process, torchrun, or srun)
    kumihimo plan CONFIG --nodes N memory per GPU, pipeline bubble, fits-or-not, before launching
    kumihimo convert ...           Megatron checkpoint <-> Hugging Face
    kumihimo eval TARGET --tasks   downstream scores of a checkpoint or Hugging Face folder
    kumihimo doctor                check the environment (and a config) before a long run

Problems the user can fix are printed as one line `kumihimo: error: ...` with exit code 2.
Stage modules are imported only when their verb runs, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from kumihimo.core.errors import UserError, disk_full_message, is_disk_full

EXIT_USER_ERROR = 2

# verb -> (module with register(parser), one-line help)
_VERBS = {
    "data": (
        "kumihimo.data_prep.cli",
        "curate raw JSONL and build Megatron .bin/.idx datasets with blend weights",
    ),
    "tokenizer": ("kumihimo.tokenizer.cli", "train, evaluate and export SentencePiece tokenizers"),
    "train": ("kumihimo.pretrain.cli", "pretrain a Llama-style model with Megatron-Core"),
    "plan": (
        "kumihimo.pretrain.plan",
        "per-GPU parameters, memory and pipeline bubble of a recipe before launching",
    ),
    "convert": (
        "kumihimo.pretrain.convert.cli",
        "convert checkpoints between Megatron (torch_dist) and Hugging Face",
    ),
    "eval": (
        "kumihimo.pretrain.evaluate.cli",
        "score a checkpoint or Hugging Face folder on task files (multiple choice, QA)",
    ),
    "quickstart": ("kumihimo.quickstart", "run the whole pipeline on the bundled sample corpus, on CPU"),
    "doctor": ("kumihimo.doctor", "check Python, torch, megatron-core, devices, communication and a config"),
    "slurm": ("kumihimo.slurm", "submit training to Slurm from a recipe (batch scripts in slurm/)"),
    "pbs": ("kumihimo.pbs", "submit training to PBS Professional (ABCI) from a recipe (slurm/train.pbs)"),
}


def build_parser(verbs: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kumihimo",
        description="Pretrain Japanese LLMs on Megatron-Core: curate -> tokenizer -> train -> convert.",
        epilog="Run `kumihimo <verb> --help` for each verb. Start with `kumihimo quickstart`.",
    )
    from kumihimo import __version__

    parser.add_argument("--version", action="version", version=f"kumihimo {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb in verbs or _VERBS:
        module_name, help_text = _VERBS[verb]
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        importlib.import_module(module_name).register(verb_parser)
    return parser


def quiet_known_notices() -> None:
    """Megatron-Core repeats, in every process, notices about choices kumihimo makes on purpose: the
    local fallbacks without Transformer Engine and apex (four warnings at import; `kumihimo doctor`
    says it once, for the GPU nodes where it matters) and GPTModel's deprecation (docs/architecture.md
    says why GPTModel). Each is said once, where it matters, instead."""
    warnings.filterwarnings(  # idempotent: an identical filter is not added twice
        "ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed", category=UserWarning
    )
    gpt_model_logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if _not_deprecation_notice not in gpt_model_logger.filters:
        gpt_model_logger.addFilter(_not_deprecation_notice)


def _not_deprecation_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("GPTModel IS DEPRECATED")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_notices()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Build only the requested verb's parser: importing every stage would make each call slow.
    verb = argv[0] if argv and argv[0] in _VERBS else None
    parser = build_parser([verb] if verb else None)
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options (`train cfg.yaml --nproc-per-node 2 optimizer.lr=1e-4`); argparse
    # stops collecting positionals at the first option, so pick the key=value leftovers up here.
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*(args.overrides or []), *overrides]
    handler = getattr(args, "handler", None)
    if handler is None:
        # A verb with sub-commands called bare, or no verb at all: show what there is.
        (parser._subparsers._group_actions[0].choices[verb] if verb else parser).print_help()
        return EXIT_USER_ERROR if verb is None and argv else 0
    try:
        return int(handler(args) or 0)
    except UserError as exc:
        return _user_error(str(exc))
    except KeyboardInterrupt:
        print("kumihimo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a full disk is the user's to fix, in every stage; anything else is a bug
        if is_disk_full(exc):
            return _user_error(disk_full_message(exc))
        raise


def _user_error(message: str) -> int:
    """Print a user error as one line (or, in a rank spawned by pretrain.cli.spawn_local, hand it to the
    launcher, which prints each distinct line once); the exit code for it."""
    report_dir = os.environ.get("KUMIHIMO_ERROR_DIR")  # pretrain.cli.ERROR_DIR_ENV: a spawned rank
    if report_dir and os.path.isdir(report_dir):
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(report_dir, f"rank{rank}.txt"), "w", encoding="utf-8") as report:
            report.write(message)
        return EXIT_USER_ERROR
    print(f"kumihimo: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


def entry() -> None:
    from kumihimo.core.processes import die_with_torchrun

    die_with_torchrun()  # a rank dies with its torchrun, however that dies
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry()

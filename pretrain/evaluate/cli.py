"""`kumihimo eval CHECKPOINT_OR_HF_DIR --tasks TASK.yaml ...`: downstream scores of a model.

TARGET is a Megatron checkpoint (checkpoint.dir or one iter_NNNNNNN folder, loaded at --tp/--pp/--cp
over --nproc-per-node processes) or a Hugging Face folder. --watch evaluates each new checkpoint of a
running job as it appears. --export-lm-eval writes the tasks as lm-evaluation-harness YAMLs and
--harness runs the harness on a Hugging Face folder for an independent number.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from kumihimo.core.errors import UserError
from kumihimo.core.files import make_output_folder
from kumihimo.core.logs import stage_logger

log = stage_logger("eval")


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score a Megatron checkpoint or a Hugging Face folder on task files (YAML + your JSONL): "
        "multiple choice by log-likelihood, QA by greedy generation and exact match."
    )
    parser.epilog = (
        "examples:\n"
        "  kumihimo eval runs/tiny/checkpoints --tasks tasks/jcommonsenseqa.yaml tasks/jnli.yaml\n"
        "  kumihimo eval runs/tiny/checkpoints --tasks tasks/ --nproc-per-node 2 --tp 2\n"
        "  kumihimo eval runs/tiny/hf --tasks tasks/ --harness\n"
        "  kumihimo eval runs/tiny/checkpoints --tasks tasks/ --watch\n"
        "  kumihimo eval --tasks tasks/ --export-lm-eval harness_tasks/"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("target", nargs="?", help="Megatron checkpoint folder or Hugging Face model folder")
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="task YAML files, folders of them, or a suite read from local files: ja_leaderboard=DATA_ROOT, "
        "jaster=DATA_ROOT (docs/evaluation.md)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="results folder (default: <checkpoint>/eval for a checkpoint, <folder>-eval beside a Hugging Face folder)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="rows scored per forward pass")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when visible")
    parser.add_argument(
        "--iteration", type=int, default=None, help="Megatron: this iteration, not the latest"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Megatron checkpoint: its tokenizer (SentencePiece model or Hugging Face tokenizer folder) "
        "if it moved; must have the recorded sha256",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1, help="Megatron: local processes to start")
    parser.add_argument("--tp", type=int, default=1, help="Megatron: tensor-parallel size of the evaluation")
    parser.add_argument(
        "--pp", type=int, default=1, help="Megatron: pipeline-parallel size of the evaluation"
    )
    parser.add_argument("--cp", type=int, default=1, help="Megatron: context-parallel size of the evaluation")
    parser.add_argument(
        "--watch", action="store_true", help="Megatron: evaluate each new checkpoint as it is saved"
    )
    parser.add_argument("--poll-seconds", type=float, default=60.0, help="--watch: how often to look")
    parser.add_argument(
        "--export-lm-eval", default=None, help="write the tasks as lm-evaluation-harness YAMLs here"
    )
    parser.add_argument("--harness", action="store_true", help="HF folder: also run lm-evaluation-harness")
    parser.set_defaults(handler=run)


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "kumihimo.json").is_file()


def run(args: argparse.Namespace) -> int:
    from kumihimo.pretrain.evaluate.suites import load_entries

    tasks = load_entries(args.tasks)
    if args.batch_size < 1:
        raise UserError(f"--batch-size={args.batch_size} must be >= 1")
    if args.export_lm_eval:
        from kumihimo.pretrain.evaluate.lm_eval_export import export_tasks

        names = export_tasks(tasks, args.export_lm_eval)
        log.info(f"wrote {len(names)} harness task(s) to {args.export_lm_eval}: {', '.join(names)}")
        if args.target is None:
            return 0
    if args.target is None:
        raise UserError(
            "kumihimo eval needs a TARGET (checkpoint or Hugging Face folder) or --export-lm-eval"
        )
    target = Path(args.target)
    if not target.exists():
        raise UserError(f"{target} does not exist; pass a checkpoint folder or a Hugging Face folder")
    device = args.device or _default_device()
    hf_folder = is_hf_folder(target)
    _refuse_misplaced_options(args, target, hf_folder)
    # a Hugging Face folder's results go beside it, not in it (an exported folder holds the export alone)
    default_output = target.parent / f"{target.name}-eval" if hf_folder else target / "eval"
    output = Path(args.output) if args.output else default_output
    make_output_folder(output, "--output")  # a file or an unwritable folder: now, not after the scoring
    if hf_folder:
        return _run_hf(args, tasks, target, output, device)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        return _spawn(args)
    return _run_megatron(args, tasks, target, output, device)


def _refuse_misplaced_options(args: argparse.Namespace, target: Path, hf_folder: bool) -> None:
    """Options that do not apply to this target, and --harness without lm-eval: refused before any
    output is made and any scoring is done."""
    if hf_folder:
        if args.harness:  # before kumihimo's own scoring, not after it
            from kumihimo.pretrain.evaluate.lm_eval_export import check_harness_installed

            check_harness_installed()
        megatron_only = [
            flag
            for flag, given in (
                ("--nproc-per-node", args.nproc_per_node != 1),
                ("--tp", args.tp != 1),
                ("--pp", args.pp != 1),
                ("--cp", args.cp != 1),
                ("--watch", args.watch),
                ("--iteration", args.iteration is not None),
                ("--tokenizer", args.tokenizer is not None),
            )
            if given
        ]
        if megatron_only:
            raise UserError(
                f"{', '.join(megatron_only)} apply to a Megatron checkpoint, but {target} is a Hugging Face "
                "folder (scored in one process with its own tokenizer); leave them out, or pass the "
                "checkpoint folder instead"
            )
        return
    if args.harness:
        raise UserError("--harness runs on a Hugging Face folder; convert first (kumihimo convert to-hf)")
    if args.watch and (target / "kumihimo.json").is_file():  # no latest marker there: it would wait forever
        raise UserError(
            f"--watch follows a checkpoint folder as new iterations are saved, but {target} is one saved "
            f"iteration; pass its checkpoint folder ({target.parent})"
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _run_hf(args, tasks, target: Path, output: Path, device: str) -> int:
    from kumihimo.pretrain.evaluate.hf_backend import HFBackend
    from kumihimo.pretrain.evaluate.runner import describe, run_tasks, write_results

    backend = HFBackend(target, device)
    results = run_tasks(tasks, backend, backend.codec, args.batch_size)
    path = write_results(results, output, {"model": str(target), "backend": "hf"})
    log.info(f"{target}: {describe(results)}")
    log.info(f"wrote {path}")
    if args.harness:
        from kumihimo.pretrain.evaluate.lm_eval_export import run_harness

        harness = run_harness(target, tasks, output / "lm_eval_tasks", device, args.batch_size)
        scores = {
            name: {k: v for k, v in res.items() if isinstance(v, float)}
            for name, res in harness["results"].items()
        }
        (output / "lm_eval_results.json").write_text(json.dumps(scores, indent=1) + "\n")
        log.info(f"lm-evaluation-harness: {json.dumps(scores)}")
    return 0


def _run_megatron(args, tasks, target: Path, output: Path, device: str) -> int:
    import torch.distributed as dist

    from kumihimo.pretrain import checkpoint_format, checkpointing
    from kumihimo.pretrain.distributed import destroy
    from kumihimo.pretrain.evaluate.megatron_backend import load_checkpoint_backend

    try:
        loaded = load_checkpoint_backend(
            target, args.tp, args.pp, args.cp, device, args.iteration, args.tokenizer
        )
        _evaluate_loaded(args, tasks, loaded, output)
        if not args.watch:
            return 0
        done = {loaded.iteration}
        while True:
            time.sleep(args.poll_seconds)
            box = [checkpoint_format.read_latest(target) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            if box[0] is None or box[0] in done:
                continue
            folder = checkpoint_format.find_checkpoint(target, box[0])
            checkpointing.load_weights(folder, loaded.backend.model)
            loaded.folder, loaded.iteration = folder, box[0]
            done.add(box[0])
            _evaluate_loaded(args, tasks, loaded, output)
    finally:
        destroy()


def _evaluate_loaded(args, tasks, loaded, output: Path) -> None:
    import torch.distributed as dist

    from kumihimo.pretrain.evaluate.runner import describe, run_tasks, write_results

    results = run_tasks(tasks, loaded.backend, loaded.codec, args.batch_size)
    if dist.get_rank() == 0:
        folder = output / f"iter_{loaded.iteration:07d}"
        path = write_results(
            results,
            folder,
            {"checkpoint": str(loaded.folder), "iteration": loaded.iteration, "backend": "megatron"},
        )
        log.info(f"{loaded.folder}: {describe(results)}")
        log.info(f"wrote {path}")


def _spawn(args: argparse.Namespace) -> int:
    """Start --nproc-per-node local processes running this same evaluation (torchrun)."""
    from kumihimo.pretrain.cli import spawn_local

    forwarded = [args.target, "--tasks", *args.tasks, "--batch-size", str(args.batch_size)]
    for flag, value in (
        ("--output", args.output),
        ("--device", args.device),
        ("--iteration", args.iteration),
        ("--tokenizer", args.tokenizer),
        ("--tp", args.tp),
        ("--pp", args.pp),
        ("--cp", args.cp),
        ("--poll-seconds", args.poll_seconds),
    ):
        if value is not None:
            forwarded += [flag, str(value)]
    if args.watch:
        forwarded.append("--watch")
    return spawn_local(args.nproc_per_node, ["eval", *forwarded])

"""`kumihimo convert to-hf | from-hf | average`: Megatron checkpoints <-> Hugging Face Llama,
Mistral, Qwen2 and Qwen3 folders, and the average of several checkpoints."""

from __future__ import annotations

import argparse

from kumihimo.core.files import check_output_folder


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  kumihimo convert to-hf --checkpoint runs/tiny-cpu/checkpoints --output hf/tiny\n"
        "  kumihimo convert from-hf --model hf/llm-jp-3-1.8b --output ckpt/llmjp3-1.8b --tp 2 --pp 1\n"
        "  kumihimo convert average runs/a/checkpoints/iter_0009000 runs/a/checkpoints --output ckpt/avg"
    )
    sub = parser.add_subparsers(dest="convert_command", metavar="<direction>")

    to_hf = sub.add_parser(
        "to-hf",
        help="Megatron checkpoint (any TP/PP) -> Hugging Face Llama/Mistral/Qwen2/Qwen3 folder",
        description="Write a Hugging Face folder of the model's family (sharded safetensors, config.json, "
        "generation_config.json, tokenizer files) from a kumihimo checkpoint, on CPU. The "
        "checkpoint's run_config.yaml and kumihimo.json describe the model.",
    )
    to_hf.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder (checkpoint.dir, holding latest_checkpointed_iteration.txt) or one iter_* folder",
    )
    to_hf.add_argument(
        "--iteration", type=int, default=None, help="iteration to convert (default: the latest)"
    )
    to_hf.add_argument("--output", required=True, help="new folder for the Hugging Face model")
    to_hf.add_argument(
        "--dtype",
        choices=("bf16", "fp32"),
        default=None,
        help="dtype of the written weights (default: the checkpoint's precision.params_dtype, so an fp32 "
        "model exports fp32 and a bf16 one bf16)",
    )
    to_hf.add_argument(
        "--keep-vocab-padding",
        action="store_true",
        help="keep Megatron's TP padding rows of the embedding and head (recorded in config.json)",
    )
    to_hf.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model or Hugging Face tokenizer folder to use instead of the recorded path "
        "(must be the same tokenizer, checked by sha256), e.g. after moving the checkpoint to another machine",
    )
    to_hf.set_defaults(handler=run_to_hf)

    from_hf = sub.add_parser(
        "from-hf",
        help="Hugging Face Llama/Mistral/Qwen2/Qwen3 folder -> weights-only kumihimo checkpoint for "
        "continual pretraining",
        description="Write a kumihimo checkpoint root (iter_0000000 with model weights only, run_config.yaml "
        "derived from config.json and laid out for --tp/--pp, kumihimo.json, the model's "
        "tokenizer under tokenizer/: its SentencePiece tokenizer.model, or else its Hugging Face tokenizer.json "
        "and the files beside it). Streams tensor by tensor with no model built: host "
        "RAM stays near the largest tensor (the embedding), whatever the model size.",
    )
    from_hf.add_argument(
        "--model", required=True, help="Hugging Face model folder (config.json + safetensors)"
    )
    from_hf.add_argument("--output", required=True, help="new folder for the checkpoint root")
    from_hf.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size the run will use (vocab padding)"
    )
    from_hf.add_argument("--pp", type=int, default=1, help="pipeline-parallel size the run will use")
    from_hf.set_defaults(handler=run_from_hf)

    average = sub.add_parser(
        "average",
        help="average the model weights of several checkpoints -> weights-only kumihimo checkpoint",
        description="Write a weights-only kumihimo checkpoint root (laid out as from-hf writes it) holding "
        "the per-element mean of the sources' model weights, sum(w_i * x_i) / sum(w_i) in float32, "
        "rounded once to the stored dtype. The sources must be the same model (tensor keys, shapes, "
        "dtypes) with the same tokenizer; they may be saved at any TP/PP. Streams one tensor at a time.",
    )
    average.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="checkpoint folders (checkpoint.dir: its latest iteration) or iter_* folders, at least two",
    )
    average.add_argument("--output", required=True, help="new folder for the averaged checkpoint root")
    average.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=None,
        metavar="W",
        help="relative weight of each checkpoint, in order (e.g. 3 1 for 3:1; default: equal)",
    )
    average.set_defaults(handler=run_average)


def run_to_hf(args: argparse.Namespace) -> int:
    from kumihimo.pretrain.convert.to_hf import convert_to_hf
    from kumihimo.pretrain.integrity import check_output_dir

    check_output_dir("--output", args.output)
    check_output_folder(args.output, "--output", "convert to-hf", replace=False)
    convert_to_hf(
        args.checkpoint,
        args.output,
        iteration=args.iteration,
        dtype=args.dtype,
        keep_vocab_padding=args.keep_vocab_padding,
        tokenizer=args.tokenizer,
    )
    return 0


def run_from_hf(args: argparse.Namespace) -> int:
    from kumihimo.core.errors import UserError
    from kumihimo.pretrain.convert.from_hf import convert_from_hf

    if args.tp < 1 or args.pp < 1:
        raise UserError(f"--tp={args.tp} and --pp={args.pp} must be >= 1")
    from kumihimo.pretrain.integrity import check_output_dir

    check_output_dir("--output", args.output)
    check_output_folder(args.output, "--output", "convert from-hf", replace=False)
    convert_from_hf(args.model, args.output, tp=args.tp, pp=args.pp)
    return 0


def run_average(args: argparse.Namespace) -> int:
    from kumihimo.pretrain.convert.average import average_checkpoints
    from kumihimo.pretrain.integrity import check_output_dir

    check_output_dir("--output", args.output)
    check_output_folder(args.output, "--output", "convert average", replace=False)
    average_checkpoints(args.checkpoints, args.output, weights=args.weights)
    return 0

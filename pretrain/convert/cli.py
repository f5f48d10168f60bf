"""`kumihimo convert to-hf | from-hf`: Megatron checkpoints <-> Hugging Face Llama folders."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  kumihimo convert to-hf --checkpoint runs/tiny-cpu/checkpoints --output hf/tiny\n"
        "  kumihimo convert from-hf --model hf/llm-jp-3-1.8b --output ckpt/llmjp3-1.8b --tp 2 --pp 1"
    )
    sub = parser.add_subparsers(dest="convert_command", metavar="<direction>")

    to_hf = sub.add_parser(
        "to-hf",
        help="Megatron checkpoint (any TP/PP) -> Hugging Face LlamaForCausalLM folder",
        description="Write a Hugging Face LlamaForCausalLM folder (sharded safetensors, config.json, "
        "generation_config.json, tokenizer files) from a kumihimo checkpoint, on CPU. The "
        "checkpoint's run_config.yaml and kumihimo.json describe the model.",
    )
    to_hf.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint.save folder (holding latest_checkpointed_iteration.txt) or one iter_* folder",
    )
    to_hf.add_argument(
        "--iteration", type=int, default=None, help="iteration to convert (default: the latest)"
    )
    to_hf.add_argument("--output", required=True, help="new folder for the Hugging Face model")
    to_hf.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the written weights"
    )
    to_hf.add_argument(
        "--keep-vocab-padding",
        action="store_true",
        help="keep Megatron's TP padding rows of the embedding and head (recorded in config.json)",
    )
    to_hf.add_argument(
        "--tokenizer",
        default=None,
        help="SentencePiece model to use instead of the recorded path (must be the same file, "
        "checked by sha256), e.g. after moving the checkpoint to another machine",
    )
    to_hf.set_defaults(handler=run_to_hf)

    from_hf = sub.add_parser(
        "from-hf",
        help="Hugging Face Llama folder -> weights-only kumihimo checkpoint for continual pretraining",
        description="Write a kumihimo checkpoint root (iter_0000000 with model weights only, run_config.yaml "
        "derived from config.json and laid out for --tp/--pp, kumihimo.json, the SentencePiece "
        "tokenizer.model if the folder has one). Streams tensor by tensor with no model built: host "
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


def run_to_hf(args: argparse.Namespace) -> int:
    from kumihimo.pretrain.convert.to_hf import convert_to_hf
    from kumihimo.pretrain.integrity import check_output_dir

    check_output_dir("--output", args.output)

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
    convert_from_hf(args.model, args.output, tp=args.tp, pp=args.pp)
    return 0

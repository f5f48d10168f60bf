"""`kumihimo convert to-hf | from-hf | average | upcycle`: Megatron checkpoints <-> Hugging Face Llama,
Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE and Qwen3-MoE folders, the average of several checkpoints, and
a mixture of experts upcycled from a dense checkpoint."""

from __future__ import annotations

import argparse

from kumihimo.core.files import check_output_folder


def register(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  kumihimo convert to-hf --checkpoint runs/tiny-cpu/checkpoints --output hf/tiny\n"
        "  kumihimo convert from-hf --model hf/llm-jp-3-1.8b --output ckpt/llmjp3-1.8b --tp 2 --pp 1\n"
        "  kumihimo convert average runs/a/checkpoints/iter_0009000 runs/a/checkpoints --output ckpt/avg\n"
        "  kumihimo convert upcycle --checkpoint ckpt/llmjp3-1.8b --output ckpt/8x1.8b --num-experts 8 "
        "--drop-ratio 0.5"
    )
    sub = parser.add_subparsers(dest="convert_command", metavar="<direction>")

    to_hf = sub.add_parser(
        "to-hf",
        help="Megatron checkpoint (any TP/PP/EP) -> Hugging Face Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen2-MoE/"
        "Qwen3-MoE folder",
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
        help="Hugging Face Llama/Mistral/Qwen2/Qwen3/Mixtral/Qwen2-MoE/Qwen3-MoE folder -> weights-only "
        "kumihimo checkpoint for continual pretraining",
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
    from_hf.add_argument(
        "--ep", type=int, default=1, help="expert-parallel size the run will use (MoE models only)"
    )
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

    upcycle = sub.add_parser(
        "upcycle",
        help="dense checkpoint -> mixture-of-experts checkpoint (upcycling, Drop-Upcycling)",
        description="Write a weights-only kumihimo checkpoint root (laid out as from-hf writes it) whose every "
        "MLP is --num-experts copies of the dense one behind a new router (top-k then softmax, so the model "
        "computes the dense model's function at step 0). With --drop-ratio r > 0 (Drop-Upcycling, "
        "Nakamura et al., ICLR 2025) each expert re-initialises its own random round(r x F) of the F "
        "intermediate channels from the statistics of the weights they replace. Streams one tensor at a time.",
    )
    upcycle.add_argument(
        "--checkpoint",
        required=True,
        help="dense checkpoint folder (checkpoint.dir: its latest iteration) or one iter_* folder",
    )
    upcycle.add_argument("--output", required=True, help="new folder for the MoE checkpoint root")
    upcycle.add_argument("--num-experts", type=int, required=True, help="experts per layer (e.g. 8)")
    upcycle.add_argument(
        "--router-topk", type=int, default=2, help="experts each token is routed to (default 2)"
    )
    upcycle.add_argument(
        "--drop-ratio",
        type=float,
        default=0.0,
        help="share r of each expert's intermediate channels to re-initialise (0: plain upcycling; the "
        "paper's choice 0.5)",
    )
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the router and the re-initialisation")
    upcycle.add_argument("--ep", type=int, default=1, help="expert-parallel size the run will use")
    upcycle.add_argument(
        "--dense-first-layers",
        type=int,
        default=0,
        help="the first this many layers keep their dense MLP as it is (model.moe.dense_first_layers; "
        "exported as Qwen3-MoE/Qwen2-MoE mlp_only_layers; default 0: every layer MoE)",
    )
    upcycle.set_defaults(handler=run_upcycle)


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

    if args.tp < 1 or args.pp < 1 or args.ep < 1:
        raise UserError(f"--tp={args.tp}, --pp={args.pp} and --ep={args.ep} must be >= 1")
    from kumihimo.pretrain.integrity import check_output_dir

    check_output_dir("--output", args.output)
    check_output_folder(args.output, "--output", "convert from-hf", replace=False)
    convert_from_hf(args.model, args.output, tp=args.tp, pp=args.pp, ep=args.ep)
    return 0


def run_average(args: argparse.Namespace) -> int:
    from kumihimo.pretrain.convert.average import average_checkpoints
    from kumihimo.pretrain.integrity import check_output_dir

    check_output_dir("--output", args.output)
    check_output_folder(args.output, "--output", "convert average", replace=False)
    average_checkpoints(args.checkpoints, args.output, weights=args.weights)
    return 0


def run_upcycle(args: argparse.Namespace) -> int:
    from kumihimo.core.errors import UserError
    from kumihimo.pretrain.convert.upcycle import upcycle_checkpoint
    from kumihimo.pretrain.integrity import check_output_dir

    if args.ep < 1:
        raise UserError(f"--ep={args.ep} must be >= 1")
    check_output_dir("--output", args.output)
    check_output_folder(args.output, "--output", "convert upcycle", replace=False)
    upcycle_checkpoint(
        args.checkpoint,
        args.output,
        num_experts=args.num_experts,
        router_topk=args.router_topk,
        drop_ratio=args.drop_ratio,
        seed=args.seed,
        ep=args.ep,
        dense_first_layers=args.dense_first_layers,
    )
    return 0

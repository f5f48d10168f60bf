"""Field-by-field peer check: Megatron-LM's own config builder vs kumihimo's, on published arguments.

For each case, Megatron-LM's `parse_args` + `validate_args` + `core_transformer_config_from_args`
(megatron/training/argument_utils.py), `get_megatron_optimizer_config` and `get_megatron_ddp_config`
build the TransformerConfig, OptimizerConfig and DistributedDataParallelConfig of the run from the
arguments its team published; kumihimo builds the same three from its recipe (`transformer_config`,
`build_optimizer_config`, `build_ddp_config`), plus the schedule and layout from the recipe. Every field
is compared. A difference is either explained in EXPLAINED below (with the reason; docs/gpu.md lists
them) or reported as UNEXPLAINED, and the script exits 1.

Cases: llmjp3-172b (llm-jp/scripts pretrain/scripts/v3-172b-exp2-sakura/train.sh), llmjp3-172b-fp8
(the same plus LLM-jp's FP8 flags), swallow-llama3.1-8b (okoge-kaz/Megatron-LM
scripts/abci/Llama-3.1-8B/llama-3.1-8b-swallow-v0.2.sh, Llama 3.1 Swallow 8B v0.2).

Megatron-LM's code: the megatron-core 0.19.2 wheel ships megatron/training identical to the
core_r0.19.0 branch (0.19.1 + fixes) of NVIDIA/Megatron-LM, so the check runs with the installed
package (the test suite does that: tests/test_megatron_peer_check.py). To run it against a checkout
beside the project instead (its megatron/training is used; megatron.core stays the installed one):

    git --git-dir=<mirror of NVIDIA/Megatron-LM> worktree add /tmp/megatron-lm core_r0.19.0
    python benchmarks/check_megatron_args.py --megatron-lm /tmp/megatron-lm [--case llmjp3-172b]

What is stubbed (only where Megatron queries the GPU or Transformer Engine; nothing else):
  * megatron.training.arguments.get_device_arch_version -> 9 (an H100, LLM-jp's GPU): validate_args
    reads the compute capability of cuda:0 for TP/CP and FSDP stream settings;
  * megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb -> a stand-in:
    TransformerConfig refuses apply_rope_fusion unless TE's fused RoPE imported;
  * kumihimo's detect_kernels -> a GPU node with CUDA, Transformer Engine and apex (LLM-jp's stack).
The environment is the job's: WORLD_SIZE (64 nodes x 8 = 512; Swallow 32 x 8 = 256), RANK=0 and
CUDA_DEVICE_MAX_CONNECTIONS=1 as both published scripts export (Megatron asserts it with TP > 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LLMJP3_172B_ARGS = """
--tensor-model-parallel-size 4 --pipeline-model-parallel-size 16 --context-parallel-size 1
--sequence-parallel --use-distributed-optimizer --distributed-timeout-minutes 15
--num-layers 96 --hidden-size 12288 --ffn-hidden-size 38464 --num-attention-heads 96
--group-query-attention --num-query-groups 16 --seq-length 4096 --max-position-embeddings 4096
--micro-batch-size 1 --global-batch-size 1728 --train-iters 292812
--tokenizer-type Llama2Tokenizer --tokenizer-model tokenizer.model --split 1000,0,0
--distributed-backend nccl --init-method-std 0.02
--lr 8e-5 --min-lr 8e-6 --lr-decay-style cosine --lr-decay-iters 290812 --weight-decay 0.1
--clip-grad 1 --lr-warmup-iters 2000 --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8
--log-interval 1 --eval-interval 292812 --eval-iters 0 --bf16 --untie-embeddings-and-output-weights
--position-embedding-type rope --disable-bias-linear --use-mcore-models --normalization RMSNorm
--norm-epsilon 1e-5 --no-masked-softmax-fusion --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu
--use-flash-attn --recompute-activations --recompute-granularity selective --attention-softmax-in-fp32
--transformer-impl transformer_engine --log-throughput
"""
"""LLM-jp-3 172B's train.sh, minus paths (--load/--save/--data-path/--data-cache-path/--wandb-*) and
the two flags of LLM-jp's Megatron-LM fork that upstream does not parse: --use-mpi (launcher; kumihimo
reads torchrun/Slurm/OpenMPI variables) and --use-z-loss (kumihimo: model.z_loss_coeff=1e-4)."""

FP8_ARGS = (
    "--fp8-format hybrid --fp8-recipe delayed --fp8-amax-history-len 1 --fp8-amax-compute-algo most_recent"
)
"""LLM-jp's FP8 attempt at 172B as reported (hybrid E4M3/E5M2, delayed scaling, amax history 1)."""

SWALLOW_V02_ARGS = """
--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --context-parallel-size 1
--sequence-parallel --use-distributed-optimizer --overlap-grad-reduce --overlap-param-gather
--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
--group-query-attention --num-query-groups 8 --seq-length 8192 --max-position-embeddings 8192
--micro-batch-size 1 --global-batch-size 1024 --train-iters 30000
--tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json --reset-position-ids --reset-attention-mask
--split 990,10,0 --distributed-backend nccl --lr 2.5e-5 --min-lr 2.5e-6 --lr-decay-style cosine
--lr-decay-iters 30000 --weight-decay 0.1 --clip-grad 1 --lr-warmup-iters 1000 --optimizer adam
--adam-beta1 0.9 --adam-beta2 0.95 --log-interval 1 --save-interval 500 --no-initialization
--eval-interval 500 --eval-iters 10 --bf16 --untie-embeddings-and-output-weights
--position-embedding-type rope --rotary-base 500000 --use-rope-scaling --rope-scaling-factor 8.0
--disable-bias-linear --use-mcore-models --normalization RMSNorm --norm-epsilon 1e-5
--no-masked-softmax-fusion --attention-dropout 0.0 --hidden-dropout 0.0 --swiglu --use-flash-attn
--attention-softmax-in-fp32 --accumulate-allreduce-grads-in-fp32 --transformer-impl transformer_engine
--log-throughput
"""
"""Llama 3.1 Swallow 8B v0.2's script, minus paths, the fork-only flags (--use-mpi, --use-z-loss,
--log-straggler, --disable-straggler-on-startup; its --tokenizer-type Llama3Tokenizer is upstream's
HuggingFaceTokenizer) and checkpoint-loading flags; its --rope-factor 8
--rope-low-freq-factor 1 --rope-high-freq-factor 4 --rope-original-max-positional-embeddings 8192 are
upstream's --use-rope-scaling --rope-scaling-factor 8 (which fixes the other three at those values)."""


@dataclass
class Case:
    recipe: str
    world_size: int
    megatron_args: str
    explained: dict[str, str] = field(default_factory=dict)
    """'group.field' -> why kumihimo differs from Megatron-LM there (docs/gpu.md lists them)."""


COMMON = {
    "transformer.perform_initialization": "kumihimo initialises every tensor itself from (seed, name, "
    "layer), identical at any TP/PP (pretrain/model.py init_parameters); Megatron's init is layout-bound",
    "transformer.use_cpu_initialization": "False vs None: both mean initialise on the GPU",
    "transformer.transformer_impl": "kumihimo picks the layer spec itself (model.transformer_impl); "
    "the field only selects Megatron-LM's spec, which kumihimo does not use",
    "transformer.inference_sampling_seed": "inference-only field (Megatron-LM copies --seed into it)",
    "transformer.embedding_init_method": "unused: perform_initialization=False (kumihimo's own init draws "
    "the embedding with the same std)",
    "transformer.init_method": "unused: perform_initialization=False (same normal(0, init_method_std))",
    "transformer.output_layer_init_method": "unused: perform_initialization=False (kumihimo scales "
    "output projections by 1/sqrt(2 num_layers) itself, as Megatron does)",
    "transformer.config_logger_dir": "Megatron-LM's debug dump folder; not used",
    "transformer.barrier_with_L1_time": "Megatron-LM's timer option; kumihimo has no Megatron timers",
    "transformer.softmax_scale": "None vs 1/sqrt(head_dim): the same scale (kumihimo passes it to carry "
    "YaRN's attention factor when set)",
    "optimizer.barrier_with_L1_time": "Megatron-LM's timer option; kumihimo has no Megatron timers",
    "optimizer.config_logger_dir": "Megatron-LM's debug dump folder; not used",
    "optimizer.fp8_recipe": "only read for MXFP8 parameter buffers (not used: no fp8_param)",
    "ddp.data_parallel_sharding_strategy": "a Megatron-FSDP field (use_megatron_fsdp is off in both)",
    "optimizer.muon_momentum": "a Muon field (the optimizer is Adam in both)",
    "optimizer.optimizer_offload_fraction": "a CPU-offload field (optimizer_cpu_offload is off in both)",
    "transformer.tensor_parallel_num_weight_shards": "None means TP x gtp_weight_remat_size, which "
    "Megatron-LM writes out (TP x 1); gtp_weight_remat_size is 1 in both: no extra weight sharding",
    "transformer.expert_tensor_parallel_num_weight_shards": "MoE field; see tensor_parallel_num_weight_shards",
    "ddp.check_for_nan_in_grad": "kumihimo judges the loss instead (resilience.on_bad_loss: skip the "
    "step or stop with exit code 4), which catches a NaN before the gradients; Megatron-LM raises",
    "training.split": "kumihimo's LLM-jp recipes hold out 0.01% for a validation loss (LLM-jp: 1000,0,0 "
    "and --eval-iters 0, no validation)",
    "training.eval_iters": "see training.split: kumihimo evaluates, LLM-jp did not",
}
"""Differences that are the same in every case."""

CASES = {
    "llmjp3-172b": Case("configs/pretrain/llmjp3-172b.yaml", 512, LLMJP3_172B_ARGS, dict(COMMON)),
    "llmjp3-172b-fp8": Case(
        "configs/pretrain/llmjp3-172b-fp8.yaml", 512, LLMJP3_172B_ARGS + FP8_ARGS, dict(COMMON)
    ),
    "swallow-llama3.1-8b": Case(
        "configs/pretrain/swallow-llama3.1-8b.yaml",
        256,
        SWALLOW_V02_ARGS,
        {
            **COMMON,
            "training.split": "the recipe holds out 0.01% (99990,10,0); Swallow held out 1% (990,10,0)",
            "training.eval_iters": "same as Swallow (10); listed when the split differs",
            "transformer.pipeline_model_parallel_size": "the recipe trains at TP 2 x PP 1 (the imported "
            "checkpoint's layout); Swallow v0.2 ran TP 2 x PP 2 on A100 40/80 GB. Keys are layout-free",
            "training.pipeline_model_parallel_size": "see transformer.pipeline_model_parallel_size",
            "transformer.microbatch_group_size_per_vp_stage": "Megatron sets it to PP; interleaving only",
            "training.data_parallel_size": "follows from PP 1 vs 2 on the same 256 GPUs",
            "training.distributed_timeout_minutes": "the recipe's 15 (LLM-jp's); Swallow kept Megatron's 10",
            "training.train_iters": "the recipe trains ~200B tokens (Llama 3.1 Swallow v0.1); v0.2 ran 30000 "
            "steps (~252B). The token budget is the recipe's choice",
            "training.lr_decay_iters": "see training.train_iters (decay to the end in both)",
            "training.reset_position_ids": "document-level positions/masks are another issue's work "
            "(explicit masks are ignored by TE's causal attention: packed sequences needed)",
            "training.reset_attention_mask": "see training.reset_position_ids",
            "training.z_loss": "Swallow's fork ran --use-z-loss; the recipe keeps z_loss_coeff=0 for a "
            "continued Llama 3.1 (Meta trained it without z-loss)",
            "training.rope_scaling": "equal: llama3 scaling, factor 8, low/high 1/4, original 8192 "
            "(Megatron applies it in GPTModel, not a config field)",
        },
    ),
}
CASES["llmjp3-172b"].explained["training.z_loss"] = (
    "equal: LLM-jp's fork --use-z-loss (1e-4) is model.z_loss_coeff=1e-4"
)
CASES["llmjp3-172b-fp8"].explained["training.z_loss"] = CASES["llmjp3-172b"].explained["training.z_loss"]


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def normalise(value):
    """A comparable, printable form: callables by name (partials with their arguments), dtypes and
    enums by name, lists as tuples."""
    if isinstance(value, functools.partial):
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(value.keywords.items()))
        return f"{normalise(value.func)}({args})"
    if callable(value) and hasattr(value, "__name__"):
        return f"{getattr(value, '__module__', '')}.{value.__name__}"
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, list):
        return tuple(normalise(v) for v in value)
    if isinstance(value, float):
        return round(value, 12)
    return repr(value) if value.__class__.__module__ == "torch" else value


def dataclass_fields(group: str, obj) -> dict[str, object]:
    return {f"{group}.{f.name}": normalise(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


@dataclass
class Difference:
    key: str
    megatron: object
    kumihimo: object
    reason: str | None


def compare(theirs: dict, ours: dict, explained: dict[str, str]) -> list[Difference]:
    diffs = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key, "<absent>"), ours.get(key, "<absent>")
        if a != b:
            diffs.append(Difference(key, a, b, explained.get(key)))
    return diffs


# ---------------------------------------------------------------------------------------------
# The two builders
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def job_environment(world_size: int):
    keep = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "CUDA_DEVICE_MAX_CONNECTIONS")}
    os.environ.update(WORLD_SIZE=str(world_size), RANK="0", CUDA_DEVICE_MAX_CONNECTIONS="1")
    try:
        yield
    finally:
        for key, value in keep.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def gpu_queries_answered():
    """The GPU/TE queries of both builders, answered as on an H100 node with TE and apex."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.training import arguments

    from kumihimo.pretrain import model

    saved = (arguments.get_device_arch_version, rope_utils.fused_apply_rotary_pos_emb, model.detect_kernels)
    arguments.get_device_arch_version = lambda: 9
    rope_utils.fused_apply_rotary_pos_emb = rope_utils.fused_apply_rotary_pos_emb or (lambda *a, **k: None)
    model.detect_kernels = lambda device: model.KernelSupport(
        cuda=True, transformer_engine=True, te_rope=True, apex_grad_accum=True, fused_softmax=True
    )
    try:
        yield
    finally:
        arguments.get_device_arch_version, rope_utils.fused_apply_rotary_pos_emb, model.detect_kernels = saved


def megatron_side(case: Case) -> tuple[dict, object]:
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.training import get_megatron_ddp_config, get_megatron_optimizer_config

    argv = sys.argv
    sys.argv = ["pretrain_gpt.py", *case.megatron_args.split()]
    try:
        with contextlib.redirect_stdout(sys.stderr):  # validate_args prints every argument
            args = parse_args()
            validate_args(args)
    finally:
        sys.argv = argv
    values = dataclass_fields("transformer", core_transformer_config_from_args(args))
    values.update(dataclass_fields("optimizer", get_megatron_optimizer_config(args)[0]))
    values.update(dataclass_fields("ddp", get_megatron_ddp_config(args)))
    values.update(
        {
            "training.seq_length": args.seq_length,
            "training.micro_batch_size": args.micro_batch_size,
            "training.global_batch_size": args.global_batch_size,
            "training.train_iters": args.train_iters,
            "training.lr_warmup_iters": args.lr_warmup_iters,
            "training.lr_decay_iters": args.lr_decay_iters or args.train_iters,
            "training.lr_decay_style": args.lr_decay_style,
            "training.split": args.split,
            "training.eval_iters": args.eval_iters,
            "training.data_parallel_size": args.data_parallel_size,
            "training.pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "training.untie_embeddings_and_output_weights": args.untie_embeddings_and_output_weights,
            "training.position_embedding_type": args.position_embedding_type,
            "training.rotary_base": float(args.rotary_base),
            "training.rope_scaling": ("llama3", 8.0) if args.use_rope_scaling else None,
            "training.make_vocab_size_divisible_by": args.make_vocab_size_divisible_by,
            "training.reset_position_ids": args.reset_position_ids,
            "training.reset_attention_mask": args.reset_attention_mask,
            "training.z_loss": "fork --use-z-loss",
            "training.distributed_timeout_minutes": args.distributed_timeout_minutes,
        }
    )
    return values, args


def kumihimo_side(case: Case) -> dict:
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.model import transformer_config
    from kumihimo.pretrain.optimizer import build_ddp_config, build_optimizer_config
    from kumihimo.pretrain.parallel import ParallelLayout

    config = configtree.load(TrainConfig, REPO / case.recipe)
    layout = ParallelLayout.from_config(config, case.world_size)
    tconfig = transformer_config(
        config.model,
        config.precision,
        config.parallelism,
        config.fusions,
        layout,
        device=config.runtime.device,
        deterministic=config.runtime.deterministic,
    )
    values = dataclass_fields("transformer", tconfig)
    values.update(
        dataclass_fields(
            "optimizer", build_optimizer_config(config.optimizer, config.precision, config.parallelism)
        )
    )
    values.update(dataclass_fields("ddp", build_ddp_config(config.precision, config.parallelism)))
    m, s = config.model, config.schedule
    rope = m.rope_scaling
    llama3 = rope.type == "llama3" and (
        rope.low_freq_factor,
        rope.high_freq_factor,
        rope.original_max_position_embeddings,
    ) == (1, 4, 8192)
    values.update(
        {
            "training.seq_length": m.seq_length,
            "training.micro_batch_size": s.micro_batch_size,
            "training.global_batch_size": s.global_batch_size,
            "training.train_iters": s.train_iters,
            "training.lr_warmup_iters": s.lr_warmup_iters,
            "training.lr_decay_iters": s.decay_iters,
            "training.lr_decay_style": s.lr_decay_style,
            "training.split": config.data.split,
            "training.eval_iters": s.eval_iters if s.eval_interval else 0,
            "training.data_parallel_size": layout.dp,
            "training.pipeline_model_parallel_size": layout.pp,
            "training.untie_embeddings_and_output_weights": not m.tie_word_embeddings,
            "training.position_embedding_type": "rope",
            "training.rotary_base": float(m.rotary_base),
            "training.rope_scaling": ("llama3", rope.factor)
            if llama3
            else None
            if rope.type == "none"
            else rope.type,
            "training.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
            "training.reset_position_ids": config.data.reset_position_ids,
            "training.reset_attention_mask": config.data.reset_attention_mask,
            "training.z_loss": f"z_loss_coeff={m.z_loss_coeff:g}",
            "training.distributed_timeout_minutes": config.runtime.distributed_timeout_minutes,
        }
    )
    return values


def run_case(name: str) -> list[Difference]:
    case = CASES[name]
    with job_environment(case.world_size), gpu_queries_answered():
        theirs, _args = megatron_side(case)
        ours = kumihimo_side(case)
    return compare(theirs, ours, case.explained)


def use_checkout(path: Path) -> None:
    """Take megatron/training from a Megatron-LM checkout, megatron.core from the installed wheel."""
    if not (path / "megatron" / "training" / "arguments.py").is_file():
        raise SystemExit(f"--megatron-lm {path}: no megatron/training/arguments.py there; give a checkout")
    import megatron.core  # noqa: F401  (bound first: the checkout's copy is not used)

    sys.path.insert(0, str(path))


def format_report(name: str, diffs: list[Difference], count: int) -> str:
    unexplained = [d for d in diffs if d.reason is None]
    lines = [
        f"### {name}: {count} fields compared, {len(diffs)} differ, {len(unexplained)} unexplained",
        "",
        "| field | Megatron-LM | kumihimo | why |",
        "|---|---|---|---|",
    ]
    for d in diffs:
        lines.append(f"| {d.key} | {d.megatron} | {d.kumihimo} | {d.reason or '**UNEXPLAINED**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: every case")
    parser.add_argument(
        "--megatron-lm", type=Path, help="Megatron-LM checkout (default: the installed wheel's)"
    )
    args = parser.parse_args(argv)
    if args.megatron_lm:
        use_checkout(args.megatron_lm.resolve())
    sys.path.insert(0, str(REPO))
    import megatron.core
    import megatron.training

    print(
        f"megatron.core {megatron.core.__version__} from {Path(megatron.core.__file__).parent}; "
        f"megatron.training from {Path(megatron.training.__file__).parent}"
    )
    failed = False
    for name in args.case or sorted(CASES):
        with job_environment(CASES[name].world_size), gpu_queries_answered():
            theirs, _ = megatron_side(CASES[name])
            ours = kumihimo_side(CASES[name])
        diffs = compare(theirs, ours, CASES[name].explained)
        print(format_report(name, diffs, len(set(theirs) | set(ours))) + "\n")
        failed |= any(d.reason is None for d in diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

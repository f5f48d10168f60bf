"""`kumihimo plan CONFIG --nodes N`: what one GPU holds before you launch, and whether it fits.

Counted per GPU of the most loaded pipeline stage (the first stage holds the embedding and, in 1F1B,
the most micro-batches in flight; the last holds the output layer and the logits):

* parameters: exact counts of this repo's Llama layout (checked against built models in the tests);
  an MoE layer (model.moe) holds its router, experts / EP experts split over expert TP, and the
  shared expert split over TP;
* weights + gradients + optimizer states, Megatron mixed precision: bf16 weights (2 B/param), fp32
  gradients (4 B, or 2 B without grad_reduce_in_fp32), and fp32 main weights + Adam m + v (12 B) which
  the distributed optimizer splits over DP (expert parameters' over expert DP = world / (PP x EP x
  ETP)). fp32 runs: 4 B weights, 4 B gradients, 8 B Adam states;
* activations saved for the backward pass, per layer and micro-batch, in the parameter dtype
  (e bytes), counted per token (x s*b tokens, s = seq / CP); t = TP, sp = t with sequence
  parallelism (norm inputs/outputs are split too) or 1 without:
  - Transformer Engine layers, flash attention (no s x s scores), no dropout masks:
    e * [4h / sp + (2q + 2kv + 3f) / t]: norm inputs and outputs, Q, K, V and the context, the SwiGLU
    gate/up outputs and their product (TE's saved tensors; not measured here, no TE on our machines).
  - local layers (Megatron's modules + our SDPA attention and RMSNorm), as measured tensor by tensor
    with `pretrain/memory.py` (exact for the tiny recipe at TP=1, TP=2+SP and PP=2; tests check it):
    e * [6h / sp + (3q + 3kv + 5f) / t] + 4 * (2 / sp + a / t) plus 4 * 4 * s * d per layer: each
    RMSNorm keeps its input, the normalised value and its output (3h) and an fp32 1/rms; attention keeps
    the fused QKV output (V is a view of it), rotated Q and K, the context and a per-head log-sum-exp
    (a heads); the MLP keeps the fused gate/up output (2f), the SiLU output, the product and the fc2
    input; RoPE keeps fp32 cos/sin for Q and K; q/k norms keep a copy of Q, the normalised Q and K and
    an fp32 1/rms per head. An MoE layer's MLP keeps its router's outputs and, per routed row, the
    permuted token and the expert's SwiGLU tensors (`moe_activation_bytes`). Context parallelism on the local path also keeps the
    gathered keys and values: + 2kv (CP - 1) / t (an estimate).
  With full recompute only the layer input (e*s*b*h / sp) stays per layer, plus one layer's working set.
  Selective recompute drops what the recomputed modules keep inside: mlp the MLP's (3f / t with TE,
  5f / t local), core_attn the local SDPA's fp32 log-sum-exp (TE's flash attention: nothing counted);
  measured on the local layers like the rest.
  In 1F1B the first stage holds PP micro-batches of L/PP layers, i.e. L layers' worth for one
  micro-batch (x (1 + (PP-1)/(PP*VPP)) with interleaving);
* logits on the last stage: s*b*V/t in fp32, twice (the logits and their gradient);
* a fixed reserve (CUDA context, NCCL buffers, allocator fragmentation), 6 GB by default.

Pipeline bubble (1F1B): (PP - 1) / (micro-batches per step x VPP), as a share of the compute time.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.pretrain.config import ModelConfig, PrecisionConfig, TrainConfig
from kumihimo.pretrain.parallel import ParallelLayout

GB = 1e9


@dataclass
class Plan:
    layout: ParallelLayout
    padded_vocab: int
    total_params: int
    params_per_gpu: int
    expert_params_per_gpu: int
    """Of params_per_gpu, the experts' (0 for a dense model)."""
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    logits_gb: float
    reserve_gb: float
    bubble: float

    @property
    def total_gb(self) -> float:
        return (
            self.weights_gb
            + self.grads_gb
            + self.optimizer_gb
            + self.activations_gb
            + self.logits_gb
            + self.reserve_gb
        )


@dataclass(frozen=True)
class ActivationSizes:
    """What, besides the model's shape and the layout, sets the bytes a layer keeps for backward."""

    dtype_bytes: int
    """Bytes per activation element (param_dtype_bytes)."""
    sequence_parallel: bool
    transformer_engine: bool
    """Transformer Engine layers (uses_transformer_engine) rather than Megatron's local ones."""

    @classmethod
    def of(cls, config: TrainConfig) -> ActivationSizes:
        return cls(
            param_dtype_bytes(config.precision),
            config.parallelism.sequence_parallel,
            uses_transformer_engine(config.model, config.runtime.device),
        )


def layer_params(m: ModelConfig) -> int:
    """Parameters of one dense layer of the whole model (all TP ranks)."""
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim
    return h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h  # QKV, proj, fc1 (gate+up), fc2, two RMSNorms


def stage_layers(m: ModelConfig, layout: ParallelLayout, stage: int) -> list[int]:
    """Global indices of the layers pipeline stage `stage` holds (all its model chunks)."""
    num_layers, vpp = m.num_layers, layout.vpp or 1
    per_chunk = num_layers // (layout.pp * vpp)
    first_layers = [(chunk * layout.pp + stage) * per_chunk for chunk in range(vpp)]
    return [first + i for first in first_layers for i in range(per_chunk)]


def mlp_params(m: ModelConfig, layout: ParallelLayout, moe_layer: bool) -> tuple[int, int]:
    """(parameters sharded like the dense model, expert parameters) of one layer's MLP on one GPU.

    An MoE layer holds a router (experts x hidden, whole on every TP rank), its share of the experts
    (experts / EP of them, each a SwiGLU of moe.ffn_hidden_size split over expert-TP) and the shared
    expert (split over TP) with its gate."""
    h = m.hidden_size
    if not moe_layer:
        return 3 * h * m.ffn_hidden_size // layout.tp, 0
    moe = m.moe
    etp = layout.etp or layout.tp
    experts = moe.num_experts // layout.ep * 3 * h * moe.expert_ffn_hidden_size(m.ffn_hidden_size) // etp
    shared = 3 * h * moe.shared_expert_ffn_hidden_size // layout.tp + (h if moe.shared_expert_gate else 0)
    return moe.num_experts * h + shared, experts


def stage_expert_params(m: ModelConfig, layout: ParallelLayout, stage: int) -> int:
    """Expert parameters on one GPU of pipeline stage `stage` (their gradients are reduced, and the
    distributed optimizer shards their states, over the expert data-parallel ranks, not DP)."""
    flags = m.moe_layer_flags
    return sum(mlp_params(m, layout, flags[i])[1] for i in stage_layers(m, layout, stage))


def stage_params(m: ModelConfig, layout: ParallelLayout, padded_vocab: int, stage: int) -> int:
    """Parameters on one GPU (one TP rank) of pipeline stage `stage`, experts included."""
    h = m.hidden_size
    q, kv = m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim
    # KV heads are replicated when there are fewer query groups than TP ranks.
    kv_per_rank = kv * max(1, layout.tp // m.query_groups) // layout.tp
    attention = h * (q // layout.tp + 2 * kv_per_rank) + (q // layout.tp) * h + 2 * h
    if m.add_qkv_bias:
        attention += q // layout.tp + 2 * kv_per_rank
    if m.qk_layernorm:
        attention += 2 * m.head_dim
    flags = m.moe_layer_flags
    count = sum(attention + sum(mlp_params(m, layout, flags[i])) for i in stage_layers(m, layout, stage))
    if stage == 0:
        count += padded_vocab * h // layout.tp
    if stage == layout.pp - 1:
        count += h  # final norm
        # a tied output layer is the embedding itself, unless it lives on another stage (then a copy)
        if not (m.tie_word_embeddings and layout.pp == 1):
            count += padded_vocab * h // layout.tp
    return count


def model_params(m: ModelConfig, padded_vocab: int) -> int:
    """Parameters of the whole model (every expert once): one GPU's count at a layout of one GPU."""
    whole = ParallelLayout(
        world_size=1, tp=1, pp=1, cp=1, dp=1, vpp=None, micro_batch_size=1, global_batch_size=1, ep=1, etp=1
    )
    return stage_params(m, whole, padded_vocab, 0)


def param_dtype_bytes(precision: PrecisionConfig) -> int:
    """Bytes per element of weights and activations in the run's parameter dtype."""
    return 2 if precision.params_dtype == "bf16" else 4


def uses_transformer_engine(model: ModelConfig, device: str) -> bool:
    """Which layers the plan counts: `auto` means Transformer Engine on GPU nodes (the te extra)."""
    impl = model.transformer_impl
    return impl == "transformer_engine" or (impl == "auto" and device == "cuda")


def activation_bytes_per_layer(
    m: ModelConfig, layout: ParallelLayout, recompute: str, sizes: ActivationSizes, moe_layer: bool = False
) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one GPU (see the module docstring)."""
    s, b, h, f = m.seq_length // layout.cp, layout.micro_batch_size, m.hidden_size, m.ffn_hidden_size
    q, kv, t = m.num_attention_heads * m.head_dim, m.query_groups * m.head_dim, layout.tp
    e = sizes.dtype_bytes
    sp = t if sizes.sequence_parallel else 1
    tokens = s * b
    if recompute == "full":
        return e * tokens * h / sp
    recomputed = set(m.recompute_modules) if recompute == "selective" else set()
    # an MoE layer's MLP is counted by moe_activation_bytes (Megatron's selective "mlp" is the dense MLP)
    mlp = 0 if "mlp" in recomputed or moe_layer else 1
    te = sizes.transformer_engine
    # selective "moe" recompute keeps only the MoE layer's input (the pre-MLP norm's output, counted)
    experts = moe_activation_bytes(m, layout, sizes) if moe_layer and "moe" not in recomputed else 0.0
    # q/k RMSNorm (Qwen3): a copy of Q and the normalised Q and K, and an fp32 1/rms per head
    qk_norm = (e * (2 * q + kv) + 4 * (m.num_attention_heads + m.query_groups)) / t if m.qk_layernorm else 0
    if te:
        return e * tokens * (4 * h / sp + (2 * q + 2 * kv + 3 * f * mlp) / t) + tokens * qk_norm + experts
    per_token = e * (6 * h / sp + (3 * q + 3 * kv + 5 * f * mlp + 2 * kv * (layout.cp - 1)) / t) + qk_norm
    per_token += 4 * 2 / sp  # fp32 1/rms of two norms
    if "core_attn" not in recomputed:
        per_token += 4 * m.num_attention_heads / t  # SDPA's fp32 log-sum-exp
    return tokens * per_token + 4 * 4 * m.seq_length * m.head_dim // layout.cp + experts  # RoPE cos/sin


def moe_activation_bytes(m: ModelConfig, layout: ParallelLayout, sizes: ActivationSizes) -> float:
    """What an MoE layer's MLP keeps for backward for one micro-batch on one GPU, routing balanced.

    The router sees this rank's T = s*b/sp tokens and keeps its top-k indices (int64) and
    probabilities; the load-balancing loss adds the softmax scores over all E experts and a second
    top-k, the z-loss the logits and their log-sum-exp (all in the router dtype). Each token goes to k
    experts, so with balanced routing a rank's experts take R = T x k x ETP rows (the all-to-all
    sends tokens between EP ranks; expert-TP ranks all see their group's tokens). They keep the
    permuted tokens (h per row), the routing probability (fp32) and, per row, what a dense SwiGLU keeps plus the activation scaled by the probability:
    6 x f_e / ETP locally (4 x f_e / ETP with TE's grouped GEMM, an estimate); permuting this rank's
    T x k (token, expert) pairs keeps 24 bytes of indices per pair. The shared expert keeps a dense SwiGLU's share for every token (f_s / TP), its
    gate the shared output and the sigmoid. Measured on the local layers with the all-to-all
    dispatcher (tests/test_pretrain_memory.py); the all-gather dispatcher's gathered tokens and the
    TE figures are estimates.
    """
    moe, te = m.moe, sizes.transformer_engine
    e = sizes.dtype_bytes
    r = 4 if moe.router_dtype == "fp32" else e
    sp = layout.tp if sizes.sequence_parallel else 1
    etp = layout.etp or layout.tp
    tokens = m.seq_length // layout.cp * layout.micro_batch_size / sp
    k, num_experts, h = moe.router_topk, moe.num_experts, m.hidden_size
    total = tokens * k * (8 + r)  # top-k indices and probabilities
    if moe.aux_loss_coeff and moe.load_balancing != "none":
        total += tokens * (num_experts * r + 8 * k) + 8 * num_experts
    if moe.z_loss_coeff:
        total += tokens * (num_experts + 1) * r
    rows = tokens * k * etp
    if moe.token_dispatcher == "allgather":  # every EP rank gathers its group's tokens and routing
        rows_seen = tokens * layout.ep * etp
        total += rows_seen * (e * h + k * (8 + r))
    expert_ffn = moe.expert_ffn_hidden_size(m.ffn_hidden_size)
    per_row = (4 if te and moe.grouped_gemm else 6) * expert_ffn / etp
    total += rows * (e * h + e * per_row + 4) + 24 * tokens * k  # indices of the local permutation
    shared = moe.shared_expert_ffn_hidden_size
    if shared:
        total += e * tokens * sp * (3 if te else 5) * shared / layout.tp
        if moe.shared_expert_gate:
            total += e * tokens * (h + 1)
    return total


def stage_activation_bytes(
    m: ModelConfig, layout: ParallelLayout, recompute: str, sizes: ActivationSizes, stage: int
) -> float:
    """Saved-for-backward bytes of the layers of pipeline stage `stage`, one micro-batch."""
    flags = m.moe_layer_flags
    return sum(
        activation_bytes_per_layer(m, layout, recompute, sizes, flags[i])
        for i in stage_layers(m, layout, stage)
    )


def microbatch_activation_bytes(
    m: ModelConfig, layout: ParallelLayout, padded_vocab: int, stage: int, sizes: ActivationSizes
) -> float:
    """Saved-for-backward bytes of one micro-batch through one pipeline stage (all its model chunks):
    what `pretrain/memory.py` measures in a run."""
    tokens = m.seq_length // layout.cp * layout.micro_batch_size
    sp = layout.tp if sizes.sequence_parallel else 1
    e = sizes.dtype_bytes
    total = stage_activation_bytes(m, layout, m.recompute, sizes, stage)
    if stage == 0:
        total += 8 * tokens  # the embedding's int64 token ids
    if stage == layout.pp - 1:
        total += tokens * (3 * e * m.hidden_size + 4) / sp  # final RMSNorm
        total += 4 * tokens * padded_vocab / layout.tp + 9 * tokens  # fp32 softmax, int64 targets, mask
    return total


def make_plan(config: TrainConfig, world_size: int, vocab_size: int, reserve_gb: float = 6.0) -> Plan:
    layout = ParallelLayout.from_config(config, world_size)
    padded = layout.padded_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by)
    per_stage = [stage_params(config.model, layout, padded, stage) for stage in range(layout.pp)]
    params = max(per_stage)
    busiest = per_stage.index(params)
    expert_params = stage_expert_params(config.model, layout, busiest)
    bf16 = config.precision.params_dtype == "bf16"
    distributed = config.parallelism.use_distributed_optimizer
    weight_bytes = param_dtype_bytes(config.precision)
    sizes = ActivationSizes.of(config)
    grad_bytes = 4 if (config.precision.grad_reduce_in_fp32 or not bf16) else 2
    state_bytes = 12 if bf16 else 8
    # the distributed optimizer shards dense states over DP and expert states over expert DP
    optimizer = (params - expert_params) * state_bytes / (layout.dp if distributed else 1)
    optimizer += expert_params * state_bytes / (layout.expert_dp if distributed else 1)
    m = config.model
    vpp = layout.vpp or 1
    interleave = 1 + (layout.pp - 1) / (layout.pp * vpp) if layout.vpp else 1.0
    # 1F1B: the first stage holds PP micro-batches of its L/PP layers, i.e. all L layers' worth
    every_layer = sum(
        activation_bytes_per_layer(m, layout, m.recompute, sizes, moe_layer)
        for moe_layer in m.moe_layer_flags
    )
    activations = every_layer * interleave
    if m.recompute == "full":  # plus one layer's full working set while it is recomputed
        activations += activation_bytes_per_layer(m, layout, "none", sizes, any(m.moe_layer_flags))
    logits = 2 * 4 * m.seq_length // layout.cp * config.schedule.micro_batch_size * padded / layout.tp
    bubble = (layout.pp - 1) / (layout.num_microbatches * vpp) if layout.pp > 1 else 0.0
    total = model_params(m, padded)
    return Plan(
        layout=layout,
        padded_vocab=padded,
        total_params=total,
        params_per_gpu=params,
        expert_params_per_gpu=expert_params,
        weights_gb=params * weight_bytes / GB,
        grads_gb=params * grad_bytes / GB,
        optimizer_gb=optimizer / GB,
        activations_gb=activations / GB,
        logits_gb=logits / GB,
        reserve_gb=reserve_gb,
        bubble=bubble,
    )


def format_plan(config: TrainConfig, plan: Plan, gpu_memory_gb: float) -> str:
    fits = plan.total_gb <= gpu_memory_gb
    rows = [
        f"{config.name}: {plan.total_params / 1e9:.2f}B parameters (vocabulary padded to {plan.padded_vocab:,})",
        f"layout: {plan.layout.describe()}",
        f"per GPU (most loaded stage): {plan.params_per_gpu / 1e9:.3f}B parameters"
        + (
            f" ({plan.expert_params_per_gpu / 1e9:.3f}B of them experts: {config.model.moe.num_experts} "
            f"split over EP={plan.layout.ep}, expert TP={plan.layout.etp or plan.layout.tp})"
            if config.model.moe.enabled
            else ""
        ),
        f"  weights          {plan.weights_gb:8.1f} GB",
        f"  gradients        {plan.grads_gb:8.1f} GB",
        f"  optimizer states {plan.optimizer_gb:8.1f} GB"
        + (
            f"  (distributed over DP={plan.layout.dp}"
            + (f", experts' over expert DP={plan.layout.expert_dp})" if config.model.moe.enabled else ")")
            if config.parallelism.use_distributed_optimizer
            else ""
        ),
        f"  activations      {plan.activations_gb:8.1f} GB  (recompute: {config.model.recompute}; "
        + (
            "Transformer Engine layers)"
            if uses_transformer_engine(config.model, config.runtime.device)
            else "local layers)"
        ),
        f"  logits           {plan.logits_gb:8.1f} GB",
        f"  reserve          {plan.reserve_gb:8.1f} GB",
        f"  total            {plan.total_gb:8.1f} GB of {gpu_memory_gb:g} GB -> "
        + ("fits" if fits else "does NOT fit: raise TP/PP, use the distributed optimizer or full recompute"),
        f"pipeline bubble: {plan.bubble:.1%} of compute time",
    ]
    return "\n".join(rows)


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Before launching: per-GPU parameters, memory (weights, gradients, optimizer states, "
        "activations, logits), pipeline bubble, and whether the run fits the GPU."
    )
    parser.epilog = (
        "example (the recipe's data.tokenizer is a cluster path: give its vocabulary size instead):\n"
        "  kumihimo plan configs/pretrain/llmjp3-172b.yaml --nodes 64 --vocab-size 99574"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", help="training recipe")
    parser.add_argument("overrides", nargs="*", help="dotted overrides")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default: %(default)s)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: %(default)s)")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory (default: H100 80 GB)")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="unpadded vocabulary size (default: read from data.tokenizer)",
    )
    parser.set_defaults(handler=run)


MIN_GPU_MEMORY_GB = 1.0
"""Below this --gpu-memory-gb is a typo (1e-300), not a GPU."""


def check_args(args: argparse.Namespace) -> None:
    """Refuse numbers that would make the plan meaningless (and print "fits" for 0 or nan GB)."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise UserError(
            f"--nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must both be >= 1; "
            "pass the job's shape, e.g. --nodes 2 --gpus-per-node 8"
        )
    if not (math.isfinite(args.gpu_memory_gb) and args.gpu_memory_gb >= MIN_GPU_MEMORY_GB):
        raise UserError(
            f"--gpu-memory-gb={args.gpu_memory_gb:g} is not a GPU memory size (at least "
            f"{MIN_GPU_MEMORY_GB:g} GB); pass the GPU's memory in GB, e.g. 80 for an H100 or 141 for an H200"
        )
    if args.vocab_size is not None and args.vocab_size < 1:
        raise UserError(
            f"--vocab-size={args.vocab_size} must be >= 1; pass the tokenizer's vocabulary size, "
            "or leave it out to read it from data.tokenizer"
        )


def run(args: argparse.Namespace) -> int:
    check_args(args)
    config = configtree.load(TrainConfig, args.config, args.overrides)
    vocab = args.vocab_size
    if vocab is None:
        if config.data.mock or config.data.tokenizer is None:
            vocab = config.data.mock_vocab_size
        else:
            from kumihimo.tokenizer.base import load_tokenizer

            try:
                vocab = load_tokenizer(config.data.tokenizer).vocab_size
            except UserError as exc:
                raise UserError(f"{exc} (or pass --vocab-size N to plan without the tokenizer)") from exc
    plan = make_plan(config, args.nodes * args.gpus_per_node, vocab)
    print(format_plan(config, plan, args.gpu_memory_gb))
    return 0

"""The training config tree: one dataclass per concern, loaded from configs/pretrain/*.yaml.

Field docstrings double as `kumihimo train --help-config` text. Checks that need more than one
section (heads vs TP, layers vs PP: `check_model_fits_layout`) live in `TrainConfig.validate`; those
that need the world size (batch vs micro-batch x DP) in `pretrain.parallel.ParallelLayout`. The schema
reads no files and imports nothing of the project above `kumihimo.core`: whether a recipe's paths exist
and agree is checked at launch by `pretrain.preflight`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from kumihimo.core.configtree import ConfigError, bad_value, from_dict


@dataclass(kw_only=True)
class RopeScalingConfig:
    """RoPE frequency scaling for long context, as Hugging Face's rope_scaling / rope_parameters."""

    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    """none (plain RoPE), linear (position interpolation: every frequency / factor), llama3 (Llama 3.1's
    wavelength-dependent interpolation) or yarn (NTK-by-parts plus an attention temperature)."""
    factor: float = 1.0
    """Context extension factor (linear, llama3, yarn)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int | None = None
    """Context length of the model before scaling (llama3, yarn; required for those types)."""
    beta_fast: float = 32.0
    """yarn: rotations per context below which interpolation stops (extrapolation boundary)."""
    beta_slow: float = 1.0
    """yarn: rotations per context above which frequencies are fully interpolated."""
    mscale: float | None = None
    """yarn: numerator scale of the attention factor (DeepSeek style); used only with mscale_all_dim."""
    mscale_all_dim: float | None = None
    """yarn: denominator scale of the attention factor; used only with mscale."""
    attention_factor: float | None = None
    """yarn: multiplier of RoPE's cos/sin (attention temperature); null derives it from factor (and mscale)."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions (Hugging Face's default)."""

    def validate(self) -> None:
        key = "model.rope_scaling"
        if self.type == "none":
            return
        if self.factor < 1:
            raise bad_value(f"{key}.factor", self.factor, f"is below 1 for type {self.type}", "use >= 1")
        if self.type in ("llama3", "yarn") and (
            self.original_max_position_embeddings is None or self.original_max_position_embeddings <= 0
        ):
            raise bad_value(
                f"{key}.original_max_position_embeddings",
                self.original_max_position_embeddings,
                f"is required by type {self.type}",
                "set the context length the model was pretrained with (e.g. 8192 for Llama 3.1)",
            )
        if self.type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise bad_value(
                f"{key}.low_freq_factor",
                self.low_freq_factor,
                f"must be positive and below high_freq_factor={self.high_freq_factor}",
                "use Llama 3.1's 1 and 4",
            )
        if self.type == "yarn" and not self.beta_slow < self.beta_fast:
            raise bad_value(
                f"{key}.beta_slow",
                self.beta_slow,
                f"must be below beta_fast={self.beta_fast}",
                "use the paper's 1 and 32",
            )


@dataclass(kw_only=True)
class MoEConfig:
    """Mixture of experts in the MLP of each layer (Megatron-Core's MoELayer); num_experts 0 is a dense
    model. Names follow Megatron-LM's --moe-* arguments (docs/moe.md has the table)."""

    num_experts: int = 0
    """Routed experts per MoE layer (--num-experts); 0: dense MLPs (this section is ignored)."""
    router_topk: int = 2
    """Experts each token is sent to (--moe-router-topk; Mixtral 2, Qwen3-MoE and LLM-jp v4 8)."""
    ffn_hidden_size: int | None = None
    """Width of each expert's SwiGLU (--moe-ffn-hidden-size); null: model.ffn_hidden_size."""
    shared_expert_ffn_hidden_size: int = 0
    """Width of the shared expert every token also passes through (DeepSeek, Qwen2-MoE;
    --moe-shared-expert-intermediate-size); 0: no shared expert."""
    shared_expert_gate: bool = False
    """Scale the shared expert's output by a learned sigmoid gate per token (Qwen2-MoE)."""
    dense_first_layers: int = 0
    """The first this many layers keep a dense MLP of model.ffn_hidden_size (DeepSeek's
    first_k_dense_replace; Megatron's --moe-layer-freq list)."""
    aux_loss_coeff: float = 1.0e-2
    """Weight of the load-balancing loss (--moe-aux-loss-coeff; LLM-jp v4 1e-2)."""
    z_loss_coeff: float = 0.0
    """Weight of the router z-loss, mean logsumexp(router logits)^2 (--moe-z-loss-coeff; LLM-jp v4 1e-3);
    0 disables it."""
    load_balancing: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss over the micro-batch's tokens (aux_loss, Switch/GShard), per sequence
    (seq_aux_loss, DeepSeek-V2) or none (aux_loss_coeff must then be 0)."""
    router_dtype: Literal["fp32"] | None = "fp32"
    """Compute the router's softmax and top-k in fp32 (--moe-router-dtype fp32); null: params dtype."""
    router_pre_softmax: bool = False
    """false: top-k of the logits, then softmax over the k (Mixtral, Qwen3-MoE norm_topk_prob=true);
    true: softmax over all experts, then top-k without renormalising (Qwen2-MoE norm_topk_prob=false).
    Needed with router_topk=1."""
    capacity_factor: float | None = None
    """Each expert takes at most capacity_factor x (tokens x topk / experts) tokens, the rest dropped;
    null: dropless (every token reaches its experts)."""
    pad_to_capacity: bool = False
    """With capacity_factor: pad every expert's input to its capacity (fixed shapes)."""
    token_drop_policy: Literal["probs", "position"] = "probs"
    """With capacity_factor: drop the tokens of lowest routing probability (probs) or the latest in
    the sequence (position)."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts' EP ranks: all-to-all (LLM-jp v4) or all-gather; both run on gloo."""
    grouped_gemm: bool = False
    """All local experts in one grouped GEMM (Transformer Engine's GroupedLinear; --moe-grouped-gemm).
    Needs Transformer Engine on a GPU; false runs the experts one after another (SequentialMLP)."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def expert_ffn_hidden_size(self, dense_ffn_hidden_size: int) -> int:
        return self.ffn_hidden_size or dense_ffn_hidden_size

    def validate(self) -> None:
        key = "model.moe"
        if self.num_experts < 0:
            raise bad_value(f"{key}.num_experts", self.num_experts, "is negative", "use 0 (dense) or a count")
        if not self.enabled:
            return
        if not 1 <= self.router_topk <= self.num_experts:
            raise bad_value(
                f"{key}.router_topk",
                self.router_topk,
                f"is not within 1..num_experts={self.num_experts}",
                "route each token to at least one and at most all experts",
            )
        if self.router_topk == 1 and not self.router_pre_softmax:
            raise bad_value(
                f"{key}.router_topk",
                1,
                "needs router_pre_softmax=true (a softmax over one expert has zero gradient)",
                "set model.moe.router_pre_softmax=true",
            )
        for name in ("ffn_hidden_size", "shared_expert_ffn_hidden_size"):
            value = getattr(self, name)
            if value is not None and value < 0 or (name == "ffn_hidden_size" and value == 0):
                raise bad_value(f"{key}.{name}", value, "must be positive", "set a width > 0")
        if self.shared_expert_gate and not self.shared_expert_ffn_hidden_size:
            raise bad_value(
                f"{key}.shared_expert_gate",
                True,
                "needs a shared expert (shared_expert_ffn_hidden_size=0)",
                "set shared_expert_ffn_hidden_size or turn the gate off",
            )
        if self.dense_first_layers < 0:
            raise bad_value(
                f"{key}.dense_first_layers", self.dense_first_layers, "is negative", "use 0 or more"
            )
        if self.aux_loss_coeff < 0 or self.z_loss_coeff < 0:
            raise ConfigError(f"{key}.aux_loss_coeff and {key}.z_loss_coeff must be >= 0; fix them")
        if self.load_balancing == "none" and self.aux_loss_coeff:
            raise bad_value(
                f"{key}.aux_loss_coeff",
                self.aux_loss_coeff,
                "is ignored with load_balancing=none",
                "set it to 0 or choose load_balancing=aux_loss",
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad_value(
                f"{key}.capacity_factor",
                self.capacity_factor,
                "must be > 0",
                "use e.g. 1.25, or null (dropless)",
            )
        if self.pad_to_capacity and self.capacity_factor is None:
            raise bad_value(
                f"{key}.pad_to_capacity",
                True,
                "needs capacity_factor (a dropless MoE has no capacity)",
                "set model.moe.capacity_factor or turn pad_to_capacity off",
            )


@dataclass(kw_only=True)
class ModelConfig:
    """Llama-family decoder: RMSNorm, SwiGLU, RoPE (optionally scaled), optional GQA, QKV bias (Qwen2),
    per-head q/k RMSNorm (Qwen3) and tied embeddings; no other biases."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 256
    """Width of the SwiGLU feed-forward layer (per branch)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value heads (GQA); null means one per query head (plain multi-head attention)."""
    kv_channels: int | None = None
    """Head dimension; null means hidden_size / num_attention_heads."""
    seq_length: int = 128
    """Tokens per training sequence."""
    max_position_embeddings: int | None = None
    """Context length the model is declared for (config.json max_position_embeddings on export), which
    may exceed the training sequence (Llama 3.1: 131072, continued at 8192); null: model.seq_length.
    `convert from-hf` records the imported model's."""
    rotary_base: int = 10000
    """RoPE base (theta)."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE frequency scaling (Llama 3.1 llama3, linear, YaRN); type none is plain RoPE."""
    add_qkv_bias: bool = False
    """Biases on the query/key/value projections only (Qwen2/Qwen2.5)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE, one weight of head_dim shared by the heads (Qwen3)."""
    tie_word_embeddings: bool = False
    """The output layer reuses the input embedding matrix (small Llama 3.2 and Qwen2.5 models)."""
    family: Literal["auto", "llama", "mistral", "qwen2", "qwen3"] = "auto"
    """Hugging Face architecture `convert to-hf` writes; auto: qwen3 with qk_layernorm, qwen2 with
    add_qkv_bias, else llama. `convert from-hf` records the family it imported."""
    norm_epsilon: float = 1.0e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation."""
    scale_output_init: bool = True
    """Scale the init std of attention and MLP output projections by 1/sqrt(2 * num_layers)."""
    z_loss_coeff: float = 0.0
    """Weight of the z-loss coeff * logsumexp(logits)^2 per token (LLM-jp-3: 1e-4); 0 disables it.
    The logged loss is the cross entropy alone."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this times the tensor-parallel size (LLM-jp: 128)."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none; selective (recompute only the modules in recompute_modules in the
    backward pass, Megatron's --recompute-granularity selective, as LLM-jp-3 172B trained); or full
    (keep only each layer's input and recompute the layer: ~1/3 more compute for far less memory)."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """With recompute=selective: the parts of each layer recomputed, in Megatron's names (its
    --recompute-modules): core_attn (the attention softmax/context), mlp (the whole dense MLP) and, with
    model.moe, moe (the whole MoE layer). Megatron's
    layernorm is refused (Transformer Engine fuses the norms into the next GEMM, so there is nothing to
    recompute, and Megatron's norm checkpoint needs TE), as are its other MoE and MLA names."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: Transformer Engine (fused kernels, FP8) or Megatron-Core's local modules
    (with this repo's SDPA attention and sequence/context-parallel support); auto picks TE when it is
    installed and runtime.device is cuda."""
    local_attention: Literal["sdpa", "unfused"] = "sdpa"
    """Core attention of the local implementation: torch scaled_dot_product_attention (flash/efficient
    kernels, fast on a GPU without TE) or Megatron's unfused softmax attention."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts (docs/moe.md); absent or num_experts 0: every layer has a dense MLP."""

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def validate(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "seq_length",
            "make_vocab_size_divisible_by",
            "rotary_base",
        ):
            if getattr(self, name) <= 0:
                raise bad_value(f"model.{name}", getattr(self, name), "must be positive", "set a value > 0")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise bad_value(
                "model.hidden_size",
                self.hidden_size,
                f"is not divisible by model.num_attention_heads={self.num_attention_heads}",
                "choose a multiple of the head count or set model.kv_channels",
            )
        if self.num_query_groups is not None and (
            self.num_query_groups <= 0 or self.num_attention_heads % self.num_query_groups
        ):
            raise bad_value(
                "model.num_query_groups",
                self.num_query_groups,
                f"does not divide model.num_attention_heads={self.num_attention_heads}",
                "choose a divisor of the head count",
            )
        if self.max_position_embeddings is not None and self.max_position_embeddings < self.seq_length:
            raise bad_value(
                "model.max_position_embeddings",
                self.max_position_embeddings,
                f"is below model.seq_length={self.seq_length}: the model would be trained on positions it "
                "does not declare",
                f"set it to at least {self.seq_length}, or null (= seq_length)",
            )
        if self.z_loss_coeff < 0:
            raise bad_value(
                "model.z_loss_coeff", self.z_loss_coeff, "is negative", "use 0 (off) or e.g. 1e-4"
            )
        if self.init_method_std <= 0 or self.norm_epsilon <= 0:
            raise ConfigError("model.init_method_std and model.norm_epsilon must be positive; fix them")
        self.rope_scaling.validate()
        if self.moe.enabled and self.moe.dense_first_layers >= self.num_layers:
            raise bad_value(
                "model.moe.dense_first_layers",
                self.moe.dense_first_layers,
                f"leaves no MoE layer of model.num_layers={self.num_layers}",
                f"use at most {self.num_layers - 1} (num_experts=0 makes the model dense)",
            )
        self._validate_recompute()
        family = self.family
        needs = {
            "qwen2": (True, False),
            "qwen3": (False, True),
            "llama": (False, False),
            "mistral": (False, False),
        }
        if family != "auto" and needs[family] != (self.add_qkv_bias, self.qk_layernorm):
            bias, norm = needs[family]
            raise bad_value(
                "model.family",
                family,
                f"needs add_qkv_bias={str(bias).lower()} and qk_layernorm={str(norm).lower()}, but they are "
                f"{str(self.add_qkv_bias).lower()} and {str(self.qk_layernorm).lower()}",
                "set family=auto or the matching flags",
            )

    RECOMPUTE_MODULES: ClassVar[tuple[str, ...]] = ("core_attn", "mlp")
    """Megatron's selective-recompute module names that apply to a dense Llama layer."""
    MOE_RECOMPUTE_MODULES: ClassVar[tuple[str, ...]] = ("moe",)
    """...and to an MoE layer: moe recomputes the whole MoELayer (router, dispatch, experts)."""

    def _validate_recompute(self) -> None:
        allowed = self.RECOMPUTE_MODULES + (self.MOE_RECOMPUTE_MODULES if self.moe.enabled else ())
        unknown = [name for name in self.recompute_modules if name not in allowed]
        if unknown:
            layer = "this model's layers do" if self.moe.enabled else "a dense Llama layer does"
            raise bad_value(
                "model.recompute_modules",
                self.recompute_modules,
                f"names {unknown}, which {layer} not have",
                f"choose from {list(allowed)}",
            )
        if self.recompute == "selective" and not self.recompute_modules:
            raise bad_value(
                "model.recompute_modules",
                [],
                "is empty with model.recompute=selective",
                "name at least one module, e.g. [core_attn], or set model.recompute=none",
            )
        if self.recompute != "selective" and self.recompute_modules != ["core_attn"]:
            raise bad_value(
                "model.recompute_modules",
                self.recompute_modules,
                f"is used only with model.recompute=selective (it is {self.recompute})",
                "set model.recompute=selective or leave recompute_modules at its default",
            )

    @property
    def moe_layer_flags(self) -> list[bool]:
        """True for each layer (0-based) whose MLP is a mixture of experts: all but the first
        moe.dense_first_layers when moe.num_experts > 0, none otherwise."""
        moe = self.moe
        return [moe.enabled and index >= moe.dense_first_layers for index in range(self.num_layers)]

    @property
    def context_length(self) -> int:
        """Positions the model is declared for: max_position_embeddings, else seq_length (what config.json
        says on export, and the longest sequence evaluation feeds it, as transformers and lm-eval do)."""
        return self.max_position_embeddings or self.seq_length

    @property
    def hf_family(self) -> str:
        """The Hugging Face family this model is exported as (both QKV bias and q/k norm: none; to-hf refuses)."""
        if self.family != "auto":
            return self.family
        return "qwen3" if self.qk_layernorm else "qwen2" if self.add_qkv_bias else "llama"


@dataclass(kw_only=True)
class ParallelismConfig:
    """How the model and batch are split over GPUs (or CPU processes)."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel size (TP): splits every layer's matrices."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size (PP): splits the layers into stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline stage (interleaved 1F1B); null disables interleaving."""
    context_parallel_size: int = 1
    """Context parallel size (CP): splits every sequence over CP ranks (2 x CP zigzag chunks); attention
    runs as TE's ring exchange, or with the local spec as an all-gather of keys/values (sdpa only)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence between tensor-parallel regions (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states and master weights over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the forward pass."""
    tp_comm_overlap: bool = False
    """Overlap tensor-parallel communication with the GEMMs (Transformer Engine userbuffers; Megatron's
    --tp-comm-overlap). Needs sequence_parallel, Transformer Engine layers and a GPU."""
    overlap_p2p_comm: bool | None = None
    """Overlap pipeline send/receive with compute (interleaved 1F1B only); null: Megatron-LM's default,
    on with virtual_pipeline_model_parallel_size > 1, off otherwise."""
    expert_model_parallel_size: int = 1
    """Expert parallel size (EP): each MoE layer's experts are split over EP ranks, which exchange
    tokens (model.moe.token_dispatcher). Must divide model.moe.num_experts."""
    expert_tensor_parallel_size: int | None = None
    """Tensor parallel size inside each expert (ETP); null: tensor_model_parallel_size (Megatron-LM's
    default). EP x ETP x PP must divide the world size."""

    @property
    def expert_tp(self) -> int:
        """The expert tensor-parallel size in effect."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size

    def validate(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            if getattr(self, name) < 1:
                raise bad_value(f"parallelism.{name}", getattr(self, name), "must be >= 1", "set 1 or more")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise bad_value(
                "parallelism.virtual_pipeline_model_parallel_size",
                vpp,
                "must be >= 1",
                "set null (no interleaving) or a count of chunks per stage",
            )
        if vpp is not None and vpp > 1 and self.pipeline_model_parallel_size < 2:
            raise bad_value(
                "parallelism.virtual_pipeline_model_parallel_size",
                vpp,
                "needs pipeline_model_parallel_size > 1",
                "raise PP or set null",
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise bad_value(
                "parallelism.sequence_parallel",
                True,
                "needs tensor_model_parallel_size > 1",
                "set it false or raise TP",
            )
        if self.tp_comm_overlap and not self.sequence_parallel:
            raise bad_value(
                "parallelism.tp_comm_overlap",
                True,
                "needs sequence_parallel (Megatron overlaps the sequence-parallel all-gather and "
                "reduce-scatter)",
                "set parallelism.sequence_parallel=true or turn it off",
            )
        if self.overlap_p2p_comm and (vpp is None or vpp < 2):
            raise bad_value(
                "parallelism.overlap_p2p_comm",
                True,
                f"needs interleaved pipelining (virtual_pipeline_model_parallel_size={vpp})",
                "set virtual_pipeline_model_parallel_size >= 2 or overlap_p2p_comm=null",
            )
        if self.overlap_param_gather and not self.use_distributed_optimizer:
            raise bad_value(
                "parallelism.overlap_param_gather",
                True,
                "needs use_distributed_optimizer",
                "set parallelism.use_distributed_optimizer=true or turn it off",
            )


@dataclass(kw_only=True)
class PrecisionConfig:
    """Numeric formats."""

    params_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of weights and activations; the optimizer keeps fp32 master weights for bf16."""
    grad_reduce_in_fp32: bool = True
    """Accumulate and all-reduce gradients in fp32 (recommended with bf16)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 matrix multiplies through Transformer Engine: hybrid (e4m3 forward, e5m2 gradients; what LLM-jp
    used) or e4m3 everywhere; null trains in BF16. Needs transformer_engine on Hopper or newer."""
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """Scaling: delayed (amax history), tensorwise (current scaling), blockwise (emulated on Hopper) or
    mxfp8 (Blackwell only)."""
    fp8_amax_history_len: int = 1
    """Steps of amax history for delayed scaling (Megatron and LLM-jp: 1)."""
    fp8_amax_compute_algo: Literal["most_recent", "max"] = "most_recent"
    """How delayed scaling picks the amax from its history."""
    fp8_margin: int = 0
    """Extra power-of-two head-room of the FP8 scale."""
    first_last_layers_bf16: bool = False
    """Keep the first and last transformer layers in BF16 (not with the delayed recipe)."""
    num_layers_at_start_in_bf16: int = 1
    """Layers at the start kept in BF16 when first_last_layers_bf16."""
    num_layers_at_end_in_bf16: int = 1
    """Layers at the end kept in BF16 when first_last_layers_bf16."""
    attention_softmax_in_fp32: bool = False
    """Compute the attention softmax in fp32 (Megatron's --attention-softmax-in-fp32; LLM-jp-3: true).
    Changes Megatron's unfused local attention; flash kernels (TE, torch SDPA) keep fp32 statistics
    anyway."""

    def validate(self) -> None:
        if self.fp8 is None:
            return
        if self.params_dtype != "bf16":
            raise bad_value(
                "precision.params_dtype",
                self.params_dtype,
                "must be bf16 with precision.fp8",
                "set precision.params_dtype=bf16 (FP8 is applied to the matrix multiplies)",
            )
        if self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise bad_value(
                "precision.first_last_layers_bf16",
                True,
                "is not supported with fp8_recipe=delayed",
                "use fp8_recipe=tensorwise or turn it off",
            )
        if self.fp8_amax_history_len < 1 or self.fp8_margin < 0:
            raise ConfigError(
                "precision.fp8_amax_history_len must be >= 1 and precision.fp8_margin >= 0; fix them"
            )


@dataclass(kw_only=True)
class FusionConfig:
    """Fused GPU kernels, as Megatron-LM's flags (its defaults). Each is used when asked for and this
    machine has it (CUDA, and Transformer Engine or apex where the kernel lives there); otherwise the
    plain path runs. `kumihimo train --check`, `kumihimo doctor --config` and the training log say in
    one line which are on and why the others are off. CPU runs use none."""

    gradient_accumulation_fusion: bool = True
    """Accumulate weight gradients straight into the fp32 main gradients inside the GEMM (needs apex's
    fused_weight_gradient_mlp_cuda, which Megatron's output layer uses; NGC containers have it)."""
    bias_activation_fusion: bool = True
    """Fused SwiGLU (Megatron's --bias-swiglu-fusion)."""
    bias_dropout_fusion: bool = True
    """Fused residual add (bias-dropout-add) after attention and MLP."""
    apply_rope_fusion: bool = True
    """Transformer Engine's fused RoPE kernel (Megatron's --no-rope-fusion turns it off)."""
    persist_layer_norm: bool = True
    """Megatron's persistent layer-norm kernel flag (--no-persist-layer-norm turns it off), passed to
    Transformer Engine's norms as Megatron-LM passes it; it has no RMSNorm kernel, so it is inert for
    this model. Off with the local layers (Megatron's torch norm refuses it)."""
    masked_softmax_fusion: bool = True
    """Fused scale-mask-softmax of Megatron's unfused local attention (model.local_attention=unfused);
    flash attention (TE, torch SDPA) does not use it. LLM-jp-3 ran --no-masked-softmax-fusion."""
    cross_entropy_loss_fusion: bool = False
    """Fused vocabulary-parallel cross entropy (Megatron's --cross-entropy-loss-fusion). Not used with
    model.z_loss_coeff > 0: the z-loss computes the loss from the logits outside the model."""
    cross_entropy_fusion_impl: Literal["native", "te"] = "native"
    """Kernel of the fused cross entropy: native (Megatron's) or te (Transformer Engine's)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW (Megatron's optimizer; TE/apex fused kernels when installed, torch otherwise)."""

    lr: float = 3.0e-4
    """Peak learning rate."""
    min_lr: float = 3.0e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1.0e-8
    """AdamW epsilon (LLM-jp-3 172B: 1e-5 underperformed; use 1e-8)."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def validate(self) -> None:
        # Every float field is already finite (configtree refuses NaN and Inf); here only the ranges.
        if self.lr <= 0:
            raise bad_value("optimizer.lr", self.lr, "must be > 0", "use e.g. 3e-4")
        if self.weight_decay < 0:
            raise bad_value(
                "optimizer.weight_decay", self.weight_decay, "is negative", "use 0 (off) or e.g. 0.1"
            )
        if self.adam_eps <= 0:
            raise bad_value("optimizer.adam_eps", self.adam_eps, "must be > 0", "use e.g. 1e-8")
        if not 0 <= self.min_lr <= self.lr:
            raise bad_value(
                "optimizer.min_lr",
                self.min_lr,
                f"is not within [0, optimizer.lr={self.lr}]",
                "set a floor between 0 and the peak learning rate",
            )
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad_value(f"optimizer.{name}", getattr(self, name), "is not in [0, 1)", "use e.g. 0.9")
        if self.clip_grad < 0:
            raise bad_value(
                "optimizer.clip_grad", self.clip_grad, "is negative", "set 0 to disable or e.g. 1.0"
            )


@dataclass(kw_only=True)
class ScheduleConfig:
    """Steps, batch sizes and the learning-rate schedule."""

    train_iters: int = 100
    """Optimizer steps to train for."""
    micro_batch_size: int = 1
    """Sequences per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    lr_warmup_iters: int = 10
    """Linear warm-up steps."""
    lr_decay_style: Literal["cosine", "linear", "constant", "WSD"] = "cosine"
    """Decay after warm-up: cosine/linear to optimizer.min_lr, constant, or warmup-stable-decay."""
    lr_decay_iters: int | None = None
    """Step at which the decay reaches min_lr; null means train_iters."""
    lr_wsd_decay_iters: int | None = None
    """For WSD: length of the final decay phase in steps; null means 10% of lr_decay_iters."""
    lr_wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """For WSD: shape of the final decay from optimizer.lr to min_lr: linear, cosine, exponential
    (2 * 0.5^t - 1) or minus_sqrt (1 - sqrt(t)), t going from 0 to 1 over lr_wsd_decay_iters."""
    exit_after_iters: int | None = None
    """Stop (and save) after this step although train_iters is larger, e.g. to split a run across jobs;
    the learning-rate schedule still follows train_iters, so a resumed run continues it exactly."""
    exit_after_minutes: float | None = None
    """Save and exit for requeue (exit code 3) before this many minutes since the trainer started, keeping
    one step, the longest measured save and exit_margin_minutes free; null: no such limit."""
    exit_at_job_end: bool = True
    """Also stop that way before the batch job's end (Slurm: SLURM_JOB_END_TIME or squeue; PBS: qstat's
    start time + walltime), without waiting for the scheduler's warning signal."""
    exit_margin_minutes: float = 2.0
    """Extra minutes kept free before the end, beyond one step and the longest measured save."""
    eval_interval: int = 0
    """Compute the validation loss every this many steps; 0 disables periodic validation."""
    eval_iters: int = 2
    """Validation batches (global batches) per evaluation."""

    @property
    def decay_iters(self) -> int:
        """Steps the learning rate decays over: lr_decay_iters, else train_iters."""
        return self.lr_decay_iters or self.train_iters

    @property
    def wsd_decay_iters(self) -> int:
        """WSD's final decay length: lr_wsd_decay_iters, else a tenth of decay_iters (at least 1)."""
        return self.lr_wsd_decay_iters or max(1, self.decay_iters // 10)

    def validate(self) -> None:
        for name in ("train_iters", "micro_batch_size", "global_batch_size"):
            if getattr(self, name) < 1:
                raise bad_value(
                    f"schedule.{name}", getattr(self, name), "must be >= 1", "set a positive count"
                )
        if self.global_batch_size % self.micro_batch_size:
            raise bad_value(
                "schedule.global_batch_size",
                self.global_batch_size,
                f"is not divisible by schedule.micro_batch_size={self.micro_batch_size}",
                f"choose a multiple of {self.micro_batch_size}",
            )
        decay_iters = self.decay_iters
        if not 0 <= self.lr_warmup_iters < decay_iters:
            raise bad_value(
                "schedule.lr_warmup_iters",
                self.lr_warmup_iters,
                f"is not within [0, lr_decay_iters (or train_iters) = {decay_iters})",
                "shorten the warm-up or lengthen the decay",
            )
        if self.lr_wsd_decay_iters is not None and not 0 < self.lr_wsd_decay_iters <= decay_iters:
            raise bad_value(
                "schedule.lr_wsd_decay_iters",
                self.lr_wsd_decay_iters,
                f"is not within (0, {decay_iters}]",
                "choose a shorter final decay",
            )
        wsd_iters = self.wsd_decay_iters
        if self.lr_decay_style == "WSD" and wsd_iters > decay_iters - self.lr_warmup_iters:
            # Megatron starts the decay at lr_decay_iters - lr_wsd_decay_iters even inside the warm-up, so
            # the LR would drop at once when the warm-up ends
            raise bad_value(
                "schedule.lr_wsd_decay_iters",
                wsd_iters,
                f"overlaps the warm-up (lr_warmup_iters={self.lr_warmup_iters}, lr_decay_iters or "
                f"train_iters={decay_iters})",
                f"choose at most {decay_iters - self.lr_warmup_iters} or a shorter warm-up",
            )
        if self.exit_after_minutes is not None and self.exit_after_minutes <= 0:
            raise bad_value(
                "schedule.exit_after_minutes", self.exit_after_minutes, "must be > 0", "set minutes or null"
            )
        if self.exit_margin_minutes < 0:
            raise bad_value(
                "schedule.exit_margin_minutes",
                self.exit_margin_minutes,
                "must be >= 0",
                "set minutes, e.g. 2",
            )
        if self.eval_interval < 0:
            raise ConfigError(
                f"schedule.eval_interval={self.eval_interval} must be >= 0 (0 turns evaluation off); fix it"
            )
        if self.eval_iters < 1:
            raise ConfigError(
                f"schedule.eval_iters={self.eval_iters} must be >= 1 (batches per evaluation); to turn "
                "evaluation off set schedule.eval_interval=0"
            )


@dataclass(kw_only=True)
class BlendEntry:
    """One dataset prefix and its sampling weight."""

    prefix: str
    """Path prefix of a Megatron indexed dataset (<prefix>.bin / <prefix>.idx)."""
    weight: float = 1.0
    """Relative sampling weight."""


@dataclass(kw_only=True)
class DataConfig:
    """Training data: Megatron indexed datasets from `kumihimo data`, blended by weight."""

    blend_file: str | None = None
    """blend.yaml written by `kumihimo data tokenize` (prefixes + weights); relative prefixes in it are
    resolved against the file's folder."""
    blend: list[BlendEntry] = field(default_factory=list)
    """Inline list of {prefix, weight}; used when blend_file is null."""
    tokenizer: str | None = None
    """SentencePiece model (file or folder with tokenizer.model), or a Hugging Face tokenizer folder
    (tokenizer.json; EOD = its eos token); fixes the vocabulary size and EOD id."""
    split: str = "98,2,0"
    """Train/valid/test split of every dataset, as weights."""
    cache_dir: str | None = None
    """Where the dataset index cache (.npy) goes; built once by rank 0 and reused; null means beside the
    checkpoint folder."""
    mock: bool = False
    """Use random tokens instead of files (throughput benchmarks and smoke tests)."""
    mock_vocab_size: int = 1024
    """Vocabulary size for mock data when no tokenizer is given."""
    eod_mask_loss: bool = False
    """Do not train on predicting the end-of-document token."""
    reset_position_ids: bool = False
    """Restart position ids (and so the RoPE rotation) after each end-of-document token."""
    reset_attention_mask: bool = False
    """Stop attention across document boundaries (a document ends with its EOD token). Needs the local
    implementation's SDPA attention (model.transformer_impl=local): Transformer Engine would ignore
    it. No s x s mask is built; one attention call per document. Pair with reset_position_ids."""

    def validate(self) -> None:
        if not self.mock and self.blend_file is None and not self.blend:
            raise ConfigError(
                "data.blend_file is missing (and data.blend is empty); point data.blend_file "
                "at the blend.yaml written by `kumihimo data tokenize`, or set data.mock=true"
            )
        if self.blend_file is not None and self.blend:
            raise bad_value("data.blend", "[...]", "is set together with data.blend_file", "use one of them")
        for i, entry in enumerate(self.blend):
            if entry.weight <= 0:
                raise bad_value(
                    f"data.blend[{i}].weight", entry.weight, "must be positive", "set a weight > 0"
                )
        try:
            parts = [float(p) for p in self.split.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0:
            raise bad_value(
                "data.split",
                self.split,
                "is not three non-negative weights with train > 0",
                'write e.g. "98,2,0"',
            )
        if self.tokenizer is None and not self.mock:
            raise ConfigError(
                "data.tokenizer is missing; set it to the tokenizer the data was tokenized with"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    """Megatron distributed checkpoints (torch_dist)."""

    RENAMED: ClassVar[dict[str, str]] = {
        "save": "write checkpoint.dir=<folder> (null means <output_dir>/checkpoints), or "
        "checkpoint.enabled=false instead of checkpoint.save=null",
    }
    """Keys of earlier releases, refused with the new spelling."""

    enabled: bool = True
    """Write checkpoints; false saves none (benchmarks, smoke runs) and resumes only from an explicit
    checkpoint.load."""
    dir: str | None = None
    """Folder for checkpoints (iter_NNNNNNN/ plus latest_checkpointed_iteration.txt); null means
    <output_dir>/checkpoints. Set it to put checkpoints on another filesystem (e.g. /checkpoints/<run>)."""
    load: str | None = None
    """Folder to resume from; null means the checkpoint folder (checkpoint.dir) when checkpoints are
    enabled and it holds one."""
    pretrained: str | None = None
    """Weights-only checkpoint to start from (e.g. written by `kumihimo convert from-hf`) when neither
    checkpoint.load nor the checkpoint folder holds a checkpoint yet: weights load at any TP/PP; optimizer,
    schedule, step and data position start fresh (continual pretraining)."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end) once past every dense_intervals phase."""
    dense_intervals: list[list[int]] = field(default_factory=list)
    """Denser saving early in a run, as [[until_step, interval], ...] in increasing order: while the step
    is <= until_step, save every interval steps (LLM-jp: [[9, 1], [100, 10], [1000, 100]])."""
    save_at_end: bool = True
    """Save after the last step."""
    keep_last: int | None = None
    """Keep only the newest this many checkpoints; null keeps all."""
    keep_multiples_of: int | None = None
    """Never prune checkpoints whose step is a multiple of this (LLM-jp kept every 1000th)."""
    async_save: bool = False
    """Write checkpoint shards from a background process while training goes on: training stops only
    to snapshot the state (copy to host memory, then fork); the folder is renamed and
    latest_checkpointed_iteration.txt updated once every rank has finished writing, at the latest
    before the next save and before the run exits."""
    allow_data_change: bool = False
    """Resume although the data's fingerprint changed (re-tokenized or other datasets, blend weights,
    data.split, model.seq_length or seed): a warning names each change. Leave false unless the change is
    intended (e.g. a new blend for a later phase): the samples after the resume then differ from an
    uninterrupted run's. Moved datasets with the same contents only print a note; another tokenizer is
    always refused."""

    def validate(self) -> None:
        if self.save_interval < 0:
            raise bad_value("checkpoint.save_interval", self.save_interval, "is negative", "set 0 or more")
        if self.keep_last is not None and self.keep_last < 1:
            raise bad_value("checkpoint.keep_last", self.keep_last, "must be >= 1", "set null to keep all")
        if self.keep_multiples_of is not None and self.keep_multiples_of < 1:
            raise bad_value(
                "checkpoint.keep_multiples_of",
                self.keep_multiples_of,
                "must be >= 1",
                "set null to prune by keep_last alone",
            )
        previous = 0
        for i, phase in enumerate(self.dense_intervals):
            if len(phase) != 2 or phase[0] <= previous or phase[1] < 1:
                raise bad_value(
                    f"checkpoint.dense_intervals[{i}]",
                    phase,
                    "is not [until_step, interval] with until_step increasing and interval >= 1",
                    "write e.g. [[9, 1], [100, 10]]",
                )
            previous = phase[0]

    def should_save(self, step: int) -> bool:
        """Whether the schedule saves after `step` (the final step is handled by save_at_end)."""
        for until_step, interval in self.dense_intervals:
            if step <= until_step:
                return step % interval == 0
        return self.save_interval > 0 and step % self.save_interval == 0


@dataclass(kw_only=True)
class BranchConfig:
    """Start from another run's checkpoint with its model and optimizer state but this config's data,
    schedule and step counters (a decay branch, a mid-training mix): step, data position and the
    learning-rate schedule start at 0 as configured here; Adam's moments and step counts continue."""

    source: str | None = None
    """Checkpoint folder of the run to branch from (its checkpoint.dir); null: not a branch. Used when
    this run's own checkpoint folder holds no checkpoint yet; after that the branch resumes from its
    own checkpoints like any run."""
    iteration: int | None = None
    """Iteration of the source to start from; null means its latest. The resolved one is written to
    this run's run_config.yaml."""
    source_sha256: str | None = None
    """sha256 of the source checkpoint's run_config.yaml and kumihimo.json, written to run_config.yaml
    when the branch starts; set it (e.g. copy it from there) to refuse a source that was replaced since."""

    def validate(self) -> None:
        if self.source is None:
            for name in ("iteration", "source_sha256"):
                if getattr(self, name) is not None:
                    raise bad_value(
                        f"branch.{name}", getattr(self, name), "needs branch.source", "set branch.source too"
                    )
        if self.iteration is not None and self.iteration < 0:
            raise bad_value(
                "branch.iteration", self.iteration, "is negative", "set a saved iteration or null for latest"
            )


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go."""

    log_interval: int = 1
    """Print a metrics line every this many steps."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here; null disables."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project; null disables."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; offline writes a run folder to sync later."""
    peak_tflops: float = 989.0
    """Dense BF16 peak of one accelerator in TFLOP/s, for MFU (H100 SXM: 989)."""
    time_every_step: bool = False
    """Give every step its own step time in metrics.jsonl (a GPU then synchronizes after every step,
    which costs a little speed); false times on a GPU only the printed steps (`log_interval`), each with
    the mean since the previous printed one."""


@dataclass(kw_only=True)
class ResilienceConfig:
    """What to do about bad losses, hangs and slow ranks (stop signals always save and exit with the
    requeue code)."""

    on_bad_loss: Literal["skip", "stop"] = "skip"
    """A NaN/Inf loss or a spike: skip the optimizer step (the batch is consumed) or stop the run
    (exit code 4, the last checkpoint stays the newest)."""
    spike_factor: float | None = None
    """A loss above this many times the running mean of recent good losses counts as a spike; null
    checks only NaN/Inf."""
    spike_warmup_steps: int = 50
    """Good steps to see before spikes are judged (early losses fall fast)."""
    max_consecutive_skips: int = 5
    """Stop (exit code 4) after this many skipped steps in a row: the run is diverging."""
    hang_timeout_factor: float | None = 5.0
    """Hang detection under a launcher: a step, evaluation or save that runs over this many times the
    longest one seen (at least hang_timeout_floor_s) ends the job (exit code 5, requeued) with the stuck
    rank named and its Python stacks in the log (docs/clusters.md); null turns the watchdog off."""
    hang_timeout_floor_s: float = 120.0
    """The shortest limit the watchdog uses, however fast the steps are."""
    hang_initial_timeout_s: float = 1800.0
    """Limit of the first step, evaluation and save (before one has been measured)."""
    straggler_interval: int = 50
    """Every this many steps, compare the ranks' own work per step (one all_gather of two floats);
    0 turns the straggler report off."""
    straggler_factor: float = 1.4
    """A rank whose work per step is over this many times the median is named in the log and metrics."""

    def validate(self) -> None:
        if self.spike_factor is not None and self.spike_factor <= 1:
            raise bad_value(
                "resilience.spike_factor",
                self.spike_factor,
                "must be > 1",
                "use e.g. 3.0, or null to check NaN/Inf only",
            )
        factor = self.hang_timeout_factor
        if factor is not None and factor <= 1:
            raise bad_value(
                "resilience.hang_timeout_factor",
                factor,
                "must be > 1",
                "use e.g. 5.0, or null to turn it off",
            )
        for name in ("hang_timeout_floor_s", "hang_initial_timeout_s"):
            if getattr(self, name) <= 0:
                raise bad_value(f"resilience.{name}", getattr(self, name), "must be > 0", "set seconds")
        if self.straggler_interval < 0:
            raise bad_value(
                "resilience.straggler_interval",
                self.straggler_interval,
                "must be >= 0",
                "use steps, 0 for off",
            )
        if self.straggler_factor <= 1:
            raise bad_value(
                "resilience.straggler_factor", self.straggler_factor, "must be > 1", "use e.g. 1.4"
            )
        if self.max_consecutive_skips < 1 or self.spike_warmup_steps < 0:
            raise ConfigError(
                "resilience.max_consecutive_skips must be >= 1 and spike_warmup_steps >= 0; fix them"
            )


@dataclass(kw_only=True)
class EvaluationConfig:
    """Evaluation in the training loop beyond the validation loss (docs/evaluation.md)."""

    tasks: list[str] = field(default_factory=list)
    """Downstream task YAML files (or folders of them), or suites read from local files
    (ja_leaderboard=<data root>, jaster=<data root>), scored on the model as laid out; empty: none."""
    interval: int | None = None
    """Steps between task evaluations; null: schedule.eval_interval."""
    batch_size: int = 8
    """Rows (prompt + choice) per forward pass on each data-parallel rank."""
    max_seconds: float | None = None
    """Time budget of one task evaluation; tasks not finished by then are reported as stopped."""
    per_source_validation: bool = True
    """With several blend prefixes, also log each prefix's validation loss (valid/<source>/loss, ppl)."""

    def validate(self) -> None:
        if (self.interval is not None and self.interval < 1) or self.batch_size < 1:
            raise ConfigError(
                f"evaluation.interval={self.interval} and evaluation.batch_size={self.batch_size} must be "
                ">= 1 (interval may be null); fix them"
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise bad_value("evaluation.max_seconds", self.max_seconds, "must be > 0", "set seconds or null")


@dataclass(kw_only=True)
class RuntimeConfig:
    """Process-level settings."""

    device: Literal["cuda", "cpu"] = "cuda"
    """cuda for real runs; cpu runs Megatron-Core on gloo (tests, quickstart)."""
    seed: int = 1234
    """Seeds initialisation (a function of seed and parameter name, not of the parallel layout) and data."""
    deterministic: bool = False
    """Ask torch for deterministic kernels (slower on GPU)."""
    distributed_timeout_minutes: int = 15
    """Timeout of collective operations."""

    RENAMED: ClassVar[dict[str, str]] = {
        "run_dir": "write output_dir: <folder> at the top level of the recipe (output_dir=<folder> on the "
        "command line)",
    }
    """Keys of earlier releases, refused with the new spelling."""


@dataclass(kw_only=True)
class TrainConfig:
    """A whole training run."""

    RECIPE_FOLDER: ClassVar[str] = "pretrain"
    """Shipped recipes for this tree live in configs/pretrain/ (a recipe argument may name one)."""

    name: str = "run"
    """Run name (logs, W&B)."""
    output_dir: str = "runs/default"
    """Run folder: the resolved run_config.yaml, metrics.jsonl, logs, the data cache (unless
    data.cache_dir is set), memory and parameter reports, and by default the checkpoints/ folder."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    """Parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numeric formats."""
    fusions: FusionConfig = field(default_factory=FusionConfig)
    """Fused GPU kernels (used where this machine has them; the training log says which)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Steps, batches, learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    branch: BranchConfig = field(default_factory=BranchConfig)
    """Branch from another run's checkpoint (new data and schedule, same model and optimizer state)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics."""
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    """Bad losses, hangs, stragglers."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Per-source validation and downstream tasks during training."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Process settings."""

    @property
    def checkpoint_dir(self) -> str | None:
        """Where checkpoints are written: checkpoint.dir, or <output_dir>/checkpoints when it is null;
        None when checkpoint.enabled is false."""
        if not self.checkpoint.enabled:
            return None
        return self.checkpoint.dir or str(Path(self.output_dir) / "checkpoints")

    def cpu_notes(self) -> list[str]:
        """What a CPU run leaves out although the config allows it, one line each, for `kumihimo train
        --check` (what it asks for outright, TE or FP8, is refused by validate instead)."""
        if self.runtime.device == "cpu" and self.model.transformer_impl == "auto":
            return [
                "model.transformer_impl=auto builds Megatron's local layers: Transformer Engine needs "
                "runtime.device=cuda"
            ]
        return []

    def _check_document_mask(self) -> None:
        """Per-document attention exists only in this repo's SDPA core attention. Transformer Engine's
        causal attention ignores an explicit mask (Megatron-LM issue #2357), so with TE documents
        would silently see each other; Megatron's unfused attention needs a dense s x s mask."""
        model = self.model
        if not self.data.reset_attention_mask:
            return
        uses_te = model.transformer_impl == "transformer_engine" or (
            model.transformer_impl == "auto" and self.runtime.device == "cuda"
        )
        if uses_te:
            raise ConfigError(
                f"data.reset_attention_mask=true with model.transformer_impl={model.transformer_impl} "
                f"(Transformer Engine on {self.runtime.device}) would train with plain causal attention "
                "across documents (TE ignores the mask); set model.transformer_impl=local"
            )
        if model.local_attention != "sdpa":
            raise bad_value(
                "model.local_attention",
                model.local_attention,
                "has no per-document attention (data.reset_attention_mask=true)",
                "set model.local_attention=sdpa",
            )

    def validate(self) -> None:
        model, par = self.model, self.parallelism
        if model.transformer_impl == "transformer_engine" and self.runtime.device == "cpu":
            raise bad_value(
                "model.transformer_impl",
                "transformer_engine",
                "needs a GPU",
                "use local (or auto) with runtime.device=cpu",
            )
        tp = par.tensor_model_parallel_size
        if model.moe.enabled and tp > 1 and not par.sequence_parallel:
            # training only: evaluation runs an MoE under TP without it (pretrain.evaluate)
            raise ConfigError(
                f"model.moe with tensor_model_parallel_size={tp} needs parallelism.sequence_parallel=true "
                "(Megatron-Core refuses to train an MoE under TP without it); set it"
            )
        if (
            model.moe.enabled
            and model.moe.grouped_gemm
            and (self.runtime.device == "cpu" or model.transformer_impl == "local")
        ):
            raise bad_value(
                "model.moe.grouped_gemm",
                True,
                f"needs Transformer Engine on a GPU (runtime.device={self.runtime.device}, "
                f"model.transformer_impl={model.transformer_impl})",
                "set model.moe.grouped_gemm=false (experts run one after another)",
            )
        prec = self.precision
        if prec.fp8 is not None and self.runtime.device == "cpu":
            raise bad_value(
                "precision.fp8", prec.fp8, "needs a Hopper GPU", "set precision.fp8=null for CPU runs"
            )
        if prec.first_last_layers_bf16 and (
            prec.num_layers_at_start_in_bf16 + prec.num_layers_at_end_in_bf16 > model.num_layers
        ):
            raise ConfigError(
                f"precision.num_layers_at_start_in_bf16 + num_layers_at_end_in_bf16 exceeds "
                f"model.num_layers={model.num_layers}; keep fewer layers in BF16"
            )
        if par.tp_comm_overlap and (self.runtime.device == "cpu" or model.transformer_impl == "local"):
            raise bad_value(
                "parallelism.tp_comm_overlap",
                True,
                f"needs Transformer Engine layers on a GPU (model.transformer_impl={model.transformer_impl}, "
                f"runtime.device={self.runtime.device})",
                "turn it off, or use transformer_impl=transformer_engine (or auto) on GPU nodes",
            )
        if prec.fp8 is not None and model.transformer_impl == "local":
            raise ConfigError(
                "precision.fp8 needs model.transformer_impl=transformer_engine (Megatron's local "
                "layers have no FP8 GEMMs); install the te extra or set precision.fp8=null"
            )
        if (
            par.context_parallel_size > 1
            and model.transformer_impl != "transformer_engine"
            and model.local_attention != "sdpa"
        ):
            raise bad_value(
                "model.local_attention",
                model.local_attention,
                f"cannot run context_parallel_size={par.context_parallel_size} (only sdpa gathers "
                "keys/values over the CP group)",
                "set model.local_attention=sdpa",
            )
        self._check_document_mask()
        if self.branch.source is not None:
            for key in ("load", "pretrained"):
                if getattr(self.checkpoint, key) is not None:
                    raise ConfigError(
                        f"branch.source and checkpoint.{key} are both set; a branch starts from "
                        f"branch.source and resumes from its own checkpoint folder: unset checkpoint.{key}"
                    )
        exit_after = self.schedule.exit_after_iters
        if exit_after is not None and not 0 < exit_after <= self.schedule.train_iters:
            raise bad_value(
                "schedule.exit_after_iters",
                exit_after,
                f"is not within (0, schedule.train_iters={self.schedule.train_iters}]",
                "set a step inside the run or null",
            )
        # Layout checks that do not need the world size (it is known only at launch).
        check_model_fits_layout(model, par)


def check_model_fits_layout(model: ModelConfig, par: ParallelismConfig) -> None:
    """Rules between the model shape and TP/PP/VPP that hold whatever the world size."""
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    vpp = par.virtual_pipeline_model_parallel_size or 1
    if model.num_attention_heads % tp:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size={tp} does not divide model.num_attention_heads="
            f"{model.num_attention_heads}; choose a TP that divides the head count"
        )
    groups = model.query_groups
    if groups % tp and tp % groups:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size={tp} and model.num_query_groups={groups} must divide "
            "one another; choose a TP that divides the number of query groups (or a multiple of it)"
        )
    if model.ffn_hidden_size % tp:
        raise ConfigError(
            f"parallelism.tensor_model_parallel_size={tp} does not divide model.ffn_hidden_size="
            f"{model.ffn_hidden_size}; choose an FFN size that is a multiple of TP"
        )
    if model.num_layers % (pp * vpp):
        raise ConfigError(
            f"model.num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size x "
            f"virtual_pipeline_model_parallel_size = {pp} x {vpp}; choose a layer count that is a multiple of "
            f"{pp * vpp} or change PP/VPP"
        )
    check_experts_fit_layout(model, par)
    seq = model.seq_length
    cp = par.context_parallel_size
    if cp > 1 and seq % (2 * cp):
        raise ConfigError(
            f"model.seq_length={seq} is not divisible by 2 x context_parallel_size={cp}; "
            f"choose a multiple of {2 * cp}"
        )
    if par.sequence_parallel and (seq // cp) % tp:
        raise ConfigError(
            f"model.seq_length={seq} / CP={cp} is not divisible by TP={tp} as sequence parallel "
            "needs; change the sequence length or TP"
        )


def check_experts_fit_layout(model: ModelConfig, par: ParallelismConfig) -> None:
    """Rules between the mixture of experts (model.moe) and EP/ETP/TP that hold whatever the world size."""
    moe = model.moe
    ep, etp, tp = par.expert_model_parallel_size, par.expert_tp, par.tensor_model_parallel_size
    if par.expert_tensor_parallel_size is not None and par.expert_tensor_parallel_size < 1:
        raise ConfigError(
            f"parallelism.expert_tensor_parallel_size={par.expert_tensor_parallel_size} must be >= 1; "
            "set a size or null (= tensor_model_parallel_size)"
        )
    if not moe.enabled:
        if ep > 1 or par.expert_tensor_parallel_size not in (None, tp):
            raise ConfigError(
                f"parallelism.expert_model_parallel_size={ep} / expert_tensor_parallel_size="
                f"{par.expert_tensor_parallel_size} need experts, but model.moe.num_experts=0; set "
                "model.moe.num_experts or leave EP at 1 and ETP null"
            )
        return
    if moe.num_experts % ep:
        raise ConfigError(
            f"parallelism.expert_model_parallel_size={ep} does not divide model.moe.num_experts="
            f"{moe.num_experts}; choose an EP that divides the number of experts"
        )
    expert_ffn = moe.expert_ffn_hidden_size(model.ffn_hidden_size)
    if expert_ffn % etp:
        raise ConfigError(
            f"model.moe.ffn_hidden_size={expert_ffn} is not divisible by the expert tensor-parallel size "
            f"{etp}; choose a multiple of {etp} or change parallelism.expert_tensor_parallel_size"
        )
    if moe.shared_expert_ffn_hidden_size % tp:
        raise ConfigError(
            f"model.moe.shared_expert_ffn_hidden_size={moe.shared_expert_ffn_hidden_size} is not "
            f"divisible by tensor_model_parallel_size={tp}; choose a multiple of {tp}"
        )


def from_saved(data: dict) -> TrainConfig:
    """The TrainConfig of a run_config.yaml written by any release. Files saved before output_dir,
    checkpoint.dir and checkpoint.enabled existed are translated (a recipe with the old keys is refused
    with the new spelling instead: recipes are edited by people, saved configs are not)."""
    data = copy.deepcopy(data)
    runtime = data.get("runtime")
    if isinstance(runtime, dict) and "run_dir" in runtime:
        data.setdefault("output_dir", runtime.pop("run_dir"))
    checkpoint = data.get("checkpoint")
    if isinstance(checkpoint, dict) and "save" in checkpoint:
        save = checkpoint.pop("save")
        checkpoint.setdefault("enabled", save is not None)
        checkpoint.setdefault("dir", save)
    return from_dict(TrainConfig, data)

"""The Llama-style decoder on Megatron-Core, built in one explicit function from the sections it needs
(model, precision, parallelism, fusions), never the whole run config.

Why GPTModel and not HybridModel: megatron-core 0.19 marks GPTModel deprecated in favour of
HybridModel, but HybridModel splits every transformer block into separate attention and MLP layers
(`decoder.layers.<i>` alternates between them), which changes every parameter name and layer index.
GPTModel's names (`decoder.layers.<i>.self_attention.linear_qkv...`) are the ones every Megatron-LM
checkpoint of the LLM-jp-3 family uses and the ones our Hugging Face mapping is written and proven
against; continual pretraining from those checkpoints needs them. The switch is one function
(`build_model`) and one name table (`pretrain.convert.mapping`) if a later core release removes it.

Layer spec: Transformer Engine when selected (fused kernels, FP8); otherwise Megatron's local modules
with `SDPAttention` and `RMSNorm` below, so a GPU without TE still gets flash/memory-efficient
attention kernels, sequence parallelism and context parallelism.

Initialisation is a function of (seed, parameter name, layer number) only, never of the parallel
layout: the same seed gives the same model at TP=1 and TP=2, PP=1 and PP=2 (checked by tests). Each
global tensor is drawn from its own generator and every rank copies out its own slice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.pretrain import moe
from kumihimo.pretrain.rope import attention_softmax_scale, rope_inv_freq

if TYPE_CHECKING:
    from kumihimo.pretrain.config import FusionConfig, ModelConfig, ParallelismConfig, PrecisionConfig
    from kumihimo.pretrain.parallel import ParallelLayout


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
log = stage_logger("train")


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for the local spec, usable with sequence parallelism.

    Megatron's WrappedTorchNorm refuses sequence_parallel only because nobody marks the weight: with
    SP each TP rank normalises its own slice of the sequence, so the weight's gradient is partial and
    must be summed over TP. Marking it `sequence_parallel` makes finalize_model_grads do exactly that
    (as Transformer Engine's norms do). The arithmetic is torch.nn.RMSNorm's, unchanged.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def context_parallel_positions(seq_length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global token positions held by one CP rank, in its local order.

    The sequence is cut into 2 x CP chunks and rank r holds chunks r and 2CP-1-r (Megatron's
    load-balanced "zigzag"), so every rank gets the same share of causal-attention work.
    """
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def slice_for_context_parallel(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This CP rank's share of a micro-batch ([b, s] tensors). `document_ids` stay whole: every rank's
    queries need the documents of the whole sequence's keys."""
    cp_size = parallel_state.get_context_parallel_world_size()
    if cp_size == 1:
        return batch
    out = {}
    for key, value in batch.items():
        if key == "document_ids":
            out[key] = value
            continue
        index = context_parallel_positions(
            value.shape[1], cp_size, parallel_state.get_context_parallel_rank(), value.device
        )
        out[key] = value.index_select(1, index)
    return out


class SDPAttention(MegatronModule):
    """Core attention with torch's scaled_dot_product_attention, for the local (non-TE) spec.

    Takes Megatron's [seq, batch, heads, head_dim] query/key/value of this TP rank and returns
    [seq, batch, heads * head_dim]. Causal; no mask tensor is built.

    Document masking (data.reset_attention_mask): the `attention_mask` argument carries the [b, s]
    document index of every token of the whole sequence (`pretrain.data.document_ids`), not a dense
    [b, 1, s, s] mask, which would cost s^2 bytes per sequence (1 GiB at 32k). Each run of queries
    that lie in one document and at consecutive positions attends causally to its own document's keys
    only: one causal SDPA call per document, with no mask tensor at all.

    Context parallelism by all-gathering keys and values over the CP group (whose backward is a
    reduce-scatter): each rank attends its zigzag query chunks against the whole sequence with a
    position-based causal mask. That costs CP x the K/V memory of a ring exchange (Transformer
    Engine's choice) but needs no custom kernel, so long sequences also train without TE. With
    documents, a query run that starts inside a document (where a zigzag chunk begins) gets a causal
    mask of its own size x its document's prefix, not of the whole sequence.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale
        self.cp_size = config.context_parallel_size

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise UserError("packed sequences and attention bias need transformer_impl=transformer_engine")
        document_ids = attention_mask
        assert document_ids is None or not document_ids.is_floating_point() and document_ids.dim() == 2, (
            "the local attention takes [b, s] document ids, not a dense mask"
        )
        seq_q, batch, num_heads, head_dim = query.shape
        causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
        keep = None
        if self.cp_size > 1:
            key, value = self._gather_context(key, value)
            q_positions = context_parallel_positions(
                key.shape[0], self.cp_size, parallel_state.get_context_parallel_rank(), key.device
            )
            if causal and document_ids is None:
                keep = q_positions[:, None] >= torch.arange(key.shape[0], device=key.device)[None, :]
        else:
            q_positions = None
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if document_ids is not None:
            assert causal, "document masking is causal"
            if q_positions is None:
                q_positions = torch.arange(seq_q, device=q.device)
            out = self._per_document(q, k, v, document_ids, q_positions)
        else:
            out = self._sdpa(q, k, v, keep, is_causal=keep is None and causal)
        return out.permute(2, 0, 1, 3).reshape(seq_q, batch, num_heads * head_dim)

    def _sdpa(self, q, k, v, keep, is_causal: bool):
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=keep,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )

    def _per_document(self, q, k, v, document_ids, q_positions):
        """[b, h, sq, d] attention of queries at global `q_positions` over whole-sequence keys, each
        query seeing only the earlier-or-equal keys of its own document."""
        rows = []
        for row in range(q.shape[0]):
            ids = document_ids[row].contiguous()
            # document indices rise along the row, so the first index of a token's document is found
            # by a sorted search: where each query's document starts
            doc_start = torch.searchsorted(ids, ids[q_positions])
            breaks = (q_positions[1:] != q_positions[:-1] + 1) | (doc_start[1:] != doc_start[:-1])
            edges = [0, *(breaks.nonzero().flatten() + 1).tolist(), len(q_positions)]
            firsts = q_positions[edges[:-1]].tolist()
            starts = doc_start[edges[:-1]].tolist()
            pieces = []
            for lo, hi, first, start in zip(edges[:-1], edges[1:], firsts, starts):
                end = first + hi - lo  # one past the run's last query position
                keys = slice(start, end)
                keep = None
                if first != start:  # the run begins inside its document: bottom-right aligned causal
                    keep = torch.arange(first, end, device=q.device)[:, None] >= torch.arange(
                        start, end, device=q.device
                    )
                pieces.append(
                    self._sdpa(
                        q[row : row + 1, :, lo:hi],
                        k[row : row + 1, :, keys],
                        v[row : row + 1, :, keys],
                        keep,
                        is_causal=keep is None,
                    )
                )
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows, dim=0)

    def _gather_context(self, key, value):
        """Whole-sequence keys/values in global position order."""
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        group = parallel_state.get_context_parallel_group()
        full = key.shape[0] * self.cp_size
        # rank order [r0's chunks, r1's chunks, ...] -> global position order
        held = torch.cat(
            [context_parallel_positions(full, self.cp_size, r, key.device) for r in range(self.cp_size)]
        )
        order = torch.argsort(held)
        return tuple(
            gather_from_sequence_parallel_region(
                t, tensor_parallel_output_grad=True, group=group
            ).index_select(0, order)
            for t in (key, value)
        )


def rope_follows_position_ids(chunk: GPTModel) -> None:
    """Make RoPE rotate each token by its `position_ids` entry (data.reset_position_ids).

    Megatron's GPTModel computes RoPE angles for positions 0..s-1 whatever the position ids say (it
    feeds them only to learned absolute embeddings), so a document that restarts at position 0 would
    be rotated as if it continued the one before. Two hooks fix that without touching its forward:
    the model's pre-hook records this call's [b, s] position ids (already this CP rank's share), and
    the rotary module's hook replaces its [s, 1, 1, d] angles by the [s, b, 1, d] angles of those
    positions, which Megatron's apply_rotary_pos_emb broadcasts like the former. Both are computed
    as Megatron does (angle = position x inverse frequency, halves concatenated).
    """
    rotary = chunk.rotary_pos_emb
    assert not rotary.rotary_interleaved and rotary.seq_len_interpolation_factor is None

    def record(_module, args, kwargs):
        rotary.position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]

    def angles_of_positions(module, _args, _output):
        inv_freq = module.inv_freq.to(module.position_ids.device)
        freqs = module.position_ids.to(inv_freq.dtype)[..., None] * inv_freq  # [b, s, d/2]
        return torch.cat((freqs, freqs), dim=-1).transpose(0, 1)[:, :, None, :]

    chunk.register_forward_pre_hook(record, with_kwargs=True)
    rotary.register_forward_hook(angles_of_positions)


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # TE raises more than ImportError when its CUDA libraries are missing.
        return False
    return True


@dataclass(frozen=True)
class KernelSupport:
    """What this machine offers the fused kernels (see `detect_kernels`)."""

    cuda: bool
    """runtime.device is cuda and torch sees a GPU."""
    transformer_engine: bool
    """Transformer Engine imports."""
    te_rope: bool
    """Megatron found Transformer Engine's fused RoPE (what TransformerConfig checks)."""
    apex_grad_accum: bool
    """apex's fused_weight_gradient_mlp_cuda (Megatron's non-TE linear layers need it for the fusion)."""
    fused_softmax: bool
    """apex's scaled_upper_triang_masked_softmax_cuda (Megatron's fused masked softmax)."""


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def detect_kernels(device: str) -> KernelSupport:
    """The one place the GPU stack is probed for fusions (tests replace it to choose as on a GPU node);
    `device` is runtime.device."""
    from megatron.core.models.common.embeddings import rope_utils

    cuda = device == "cuda" and torch.cuda.is_available()
    return KernelSupport(
        cuda=cuda,
        transformer_engine=transformer_engine_available(),
        te_rope=rope_utils.fused_apply_rotary_pos_emb is not None,
        apex_grad_accum=_importable("fused_weight_gradient_mlp_cuda"),
        fused_softmax=_importable("scaled_upper_triang_masked_softmax_cuda"),
    )


@dataclass(frozen=True)
class FusionChoice:
    """One fused kernel: whether the run uses it and why (when off, what is missing)."""

    name: str
    """TransformerConfig field (the `fusions.` key of the same name)."""
    on: bool
    reason: str = ""


def resolve_fusions(
    model: ModelConfig, wanted: FusionConfig, device: str, support: KernelSupport | None = None
) -> list[FusionChoice]:
    """Each `fusions.` field as the run will use it: asked for and available, or off with the reason."""
    support = support or detect_kernels(device)
    impl = resolve_transformer_impl(model, device, support)
    no_gpu = "runtime.device=cpu" if device == "cpu" else "no CUDA device"
    # Megatron's fused masked softmax serves only its own unfused attention
    if impl == "transformer_engine" or model.local_attention == "sdpa":
        owner = "Transformer Engine" if impl == "transformer_engine" else "torch SDPA"
        softmax = f"unused: {owner} attention has its own softmax"
    else:
        softmax = None if support.fused_softmax else "needs apex's scaled_upper_triang_masked_softmax_cuda"
    if model.z_loss_coeff:  # the model returns logits and pretrain/loss.py computes the loss
        cross_entropy = "unused: the z-loss computes the loss outside the model"
    elif wanted.cross_entropy_fusion_impl == "te" and not support.transformer_engine:
        cross_entropy = "needs Transformer Engine (fusions.cross_entropy_fusion_impl=te)"
    else:
        cross_entropy = None
    needs = {  # what each fusion lacks on this machine besides CUDA (None: nothing)
        "gradient_accumulation_fusion": None
        if support.apex_grad_accum
        else "needs apex's fused_weight_gradient_mlp_cuda",
        "bias_activation_fusion": None,
        "bias_dropout_fusion": None,
        "apply_rope_fusion": None if support.te_rope else "needs Transformer Engine's fused RoPE",
        # Megatron's torch norm wrapper asserts it off; only TE's norms (which ignore it for RMSNorm) take it
        "persist_layer_norm": None
        if impl == "transformer_engine"
        else "unused: local layers use torch RMSNorm",
        "masked_softmax_fusion": softmax,
        "cross_entropy_loss_fusion": cross_entropy,
    }
    choices = []
    for name, missing in needs.items():
        if not getattr(wanted, name):
            choices.append(FusionChoice(name, False, f"fusions.{name}=false"))
        elif not support.cuda:
            choices.append(FusionChoice(name, False, no_gpu))
        elif missing:
            choices.append(FusionChoice(name, False, missing))
        else:
            choices.append(FusionChoice(name, True))
    return choices


def describe_fusions(choices: list[FusionChoice]) -> str:
    """One line: the fusions on, then each one off with its reason (grouped by reason)."""
    on = [c.name for c in choices if c.on]
    by_reason: dict[str, list[str]] = {}
    for choice in choices:
        if not choice.on:
            by_reason.setdefault(choice.reason, []).append(choice.name)
    off = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in by_reason.items())
    return f"on: {', '.join(on) or 'none'}" + (f"; off: {off}" if off else "")


def resolve_transformer_impl(model: ModelConfig, device: str, support: KernelSupport | None = None) -> str:
    """model.transformer_impl with `auto` decided: TE layers on a CUDA run where TE imports."""
    impl = model.transformer_impl
    te = support.transformer_engine if support is not None else transformer_engine_available()
    if impl == "auto":
        return "transformer_engine" if device == "cuda" and te else "local"
    if impl == "transformer_engine" and not te:
        raise UserError(
            "model.transformer_impl=transformer_engine but Transformer Engine is not installed; "
            "pip install -e '.[te]' from the checkout on the GPU nodes or set model.transformer_impl=local"
        )
    return impl


def check_fp8_possible(model: ModelConfig, precision: PrecisionConfig, device: str) -> None:
    """FP8 needs the Transformer Engine layers and a Hopper (sm_90) or newer GPU: say so before building."""
    if precision.fp8 is None:
        return
    if resolve_transformer_impl(model, device) != "transformer_engine":
        raise UserError(
            "precision.fp8 needs Transformer Engine, which is not installed here; "
            "pip install -e '.[te]' from the checkout on the GPU nodes or set precision.fp8=null"
        )
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        raise UserError(
            f"precision.fp8 needs a Hopper (sm_90) or newer GPU; this one is sm_{major}{minor}. "
            "Set precision.fp8=null to train in BF16"
        )
    if precision.fp8_recipe == "mxfp8" and major < 10:
        raise UserError(
            f"precision.fp8_recipe=mxfp8 needs a Blackwell GPU; this one is sm_{major}{minor}. "
            "Use delayed or tensorwise on Hopper"
        )


_USERBUFFERS_READY = False


def initialize_tp_comm_overlap(
    model: ModelConfig,
    precision: PrecisionConfig,
    parallelism: ParallelismConfig,
    layout: ParallelLayout,
    *,
    micro_batch_size: int,
    device: str,
) -> None:
    """Transformer Engine's userbuffers for parallelism.tp_comm_overlap, sized as Megatron-LM sizes them
    (one micro-batch of tokens per CP rank x hidden, `micro_batch_size` being schedule.micro_batch_size);
    once per process, after the process groups."""
    global _USERBUFFERS_READY
    if not parallelism.tp_comm_overlap or _USERBUFFERS_READY:
        return
    if resolve_transformer_impl(model, device) != "transformer_engine":
        raise UserError(
            "parallelism.tp_comm_overlap needs Transformer Engine layers, which are not in use here; "
            "pip install -e '.[te]' from the checkout on the GPU nodes or set parallelism.tp_comm_overlap=false"
        )
    from transformer_engine.pytorch.module import base

    shape = [model.seq_length * micro_batch_size // layout.cp, model.hidden_size]
    if hasattr(base, "UserBufferQuantizationMode"):  # TE >= 2.7
        modes = [
            base.UserBufferQuantizationMode.FP8 if precision.fp8 else base.UserBufferQuantizationMode.NONE
        ]
        if precision.fp8 and precision.first_last_layers_bf16:
            modes.append(base.UserBufferQuantizationMode.NONE)
        base.initialize_ub(shape=shape, tp_size=layout.tp, quantization_modes=modes, bootstrap_backend="nccl")
    else:
        base.initialize_ub(
            shape=shape, tp_size=layout.tp, use_fp8=precision.fp8 is not None, bootstrap_backend="nccl"
        )
    _USERBUFFERS_READY = True


def _fp8_fields(precision: PrecisionConfig) -> dict:
    if precision.fp8 is None:
        return {}
    return {
        "fp8": precision.fp8,
        "fp8_recipe": precision.fp8_recipe,
        "fp8_margin": precision.fp8_margin,
        "fp8_amax_history_len": precision.fp8_amax_history_len,
        "fp8_amax_compute_algo": precision.fp8_amax_compute_algo,
        "first_last_layers_bf16": precision.first_last_layers_bf16,
        "num_layers_at_start_in_bf16": precision.num_layers_at_start_in_bf16,
        "num_layers_at_end_in_bf16": precision.num_layers_at_end_in_bf16,
    }


def _recompute_fields(model: ModelConfig) -> dict:
    if model.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    if model.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": list(model.recompute_modules)}
    return {}


def _overlap_fields(parallelism: ParallelismConfig, layout: ParallelLayout) -> dict:
    """Pipeline p2p and TP communication overlap, as Megatron-LM's arguments set them."""
    overlap_p2p = parallelism.overlap_p2p_comm
    if overlap_p2p is None:  # Megatron-LM: on by default, off without interleaving
        overlap_p2p = (layout.vpp or 1) > 1
    return {
        "overlap_p2p_comm": overlap_p2p,
        "batch_p2p_comm": not overlap_p2p,
        "tp_comm_overlap": parallelism.tp_comm_overlap,
    }


def transformer_config(
    model: ModelConfig,
    precision: PrecisionConfig,
    parallelism: ParallelismConfig,
    fusions: FusionConfig,
    layout: ParallelLayout,
    *,
    device: str,
    deterministic: bool,
    support: KernelSupport | None = None,
) -> TransformerConfig:
    """Map the model, precision, parallelism and fusions sections onto Megatron's TransformerConfig:
    each fusion on where this machine has its kernel (`resolve_fusions`), recompute and overlap as
    configured. `device` and `deterministic` are runtime.device and runtime.deterministic."""
    dtype = DTYPES[precision.params_dtype]
    on_cpu = device == "cpu"
    fused = {choice.name: choice.on for choice in resolve_fusions(model, fusions, device, support)}
    return TransformerConfig(
        **_fp8_fields(precision),
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        softmax_scale=attention_softmax_scale(model),  # YaRN's attention factor, else the default
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        perform_initialization=False,  # init_parameters() below does it, independent of the layout
        use_cpu_initialization=on_cpu,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        cp_comm_type="p2p",  # Megatron-LM's default: TE's ring exchange of keys/values
        sequence_parallel=parallelism.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        attention_softmax_in_fp32=precision.attention_softmax_in_fp32,
        **fused,
        cross_entropy_fusion_impl=fusions.cross_entropy_fusion_impl,
        deallocate_pipeline_outputs=True,  # as Megatron-LM: PP sends free their output's data
        deterministic_mode=deterministic,
        **_recompute_fields(model),
        **_overlap_fields(parallelism, layout),
        **moe.transformer_fields(model, parallelism),
    )


def layer_spec(model: ModelConfig, impl: str, num_experts: int | None = None):
    """One decoder layer: a dense SwiGLU MLP, or an MoELayer of `num_experts` experts; `impl` is
    `resolve_transformer_impl`'s answer.

    Checkpoint keys are the same for both implementations. A dense layer's pre-MLP norm is
    `mlp.linear_fc1.layer_norm_weight` (TE fuses it into fc1; the local spec renames its separate norm
    so). An MoE layer has no fused fc1, so TE keys its norm `pre_mlp_layernorm.weight`, as Megatron-LM's
    MoE checkpoints do; Megatron's local spec would still rename it to the dense name, so for MoE
    layers we drop that rename."""
    grouped_gemm = num_experts is not None and model.moe.grouped_gemm
    if impl == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=grouped_gemm, qk_layernorm=model.qk_layernorm
        )
    # normalization= is required: without it the local spec silently builds LayerNorm.
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=grouped_gemm,
        normalization="RMSNorm",
        qk_layernorm=model.qk_layernorm,
    )
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if num_experts is not None:  # a copy: never edit a dict Megatron may share between specs
        keys_map = spec.submodules.sharded_state_dict_keys_map
        spec.submodules.sharded_state_dict_keys_map = {
            old: new for old, new in keys_map.items() if old != "pre_mlp_layernorm."
        }
    if model.qk_layernorm:  # per head: Megatron builds them with hidden_size=head_dim
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    if model.local_attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def block_spec(model: ModelConfig, impl: str, tconfig: TransformerConfig, vp_stage: int | None):
    """The decoder block of one model chunk: the layer spec (dense or MoE per layer, `pretrain.moe`),
    plus our RMSNorm as the final norm for the local spec (Megatron would pick its torch wrapper, which
    refuses sequence parallelism)."""
    te = impl == "transformer_engine"
    if te and not model.moe.enabled:
        return layer_spec(model, impl)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    num_layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    if model.moe.enabled:
        first = get_transformer_layer_offset(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
        specs = moe.decoder_layer_specs(model, partial(layer_spec, model, impl), first, num_layers)
    else:
        specs = [layer_spec(model, impl)] * num_layers
    if te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=RMSNorm)


def build_model(
    model: ModelConfig,
    precision: PrecisionConfig,
    parallelism: ParallelismConfig,
    fusions: FusionConfig,
    layout: ParallelLayout,
    padded_vocab_size: int,
    *,
    device: str,
    seed: int,
    deterministic: bool,
    micro_batch_size: int,
    reset_position_ids: bool,
) -> list[GPTModel]:
    """This rank's model chunks (one, or VPP of them with interleaved pipelining), initialised.

    Built from the model, precision, parallelism and fusions sections; the plain values are
    runtime.device, runtime.seed, runtime.deterministic, schedule.micro_batch_size (sizes TE's
    userbuffers) and data.reset_position_ids (RoPE then follows the batch's position ids)."""
    check_fp8_possible(model, precision, device)
    impl = resolve_transformer_impl(model, device)
    if model.moe.grouped_gemm and impl != "transformer_engine":
        raise UserError(
            "model.moe.grouped_gemm needs Transformer Engine, which is not in use here; "
            "pip install -e '.[te]' from the checkout on the GPU nodes or set model.moe.grouped_gemm=false"
        )
    initialize_tp_comm_overlap(
        model, precision, parallelism, layout, micro_batch_size=micro_batch_size, device=device
    )
    tconfig = transformer_config(
        model, precision, parallelism, fusions, layout, device=device, deterministic=deterministic
    )
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info(f"fusions {describe_fusions(resolve_fusions(model, fusions, device))}")
    num_chunks = layout.vpp or 1
    chunks = []
    for vp_stage in range(num_chunks):
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = GPTModel(
            config=tconfig,
            transformer_layer_spec=block_spec(model, impl, tconfig, vp_stage if layout.vpp else None),
            vocab_size=padded_vocab_size,
            max_sequence_length=model.seq_length,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=model.rotary_base,
            vp_stage=vp_stage if layout.vpp else None,
        )
        target = torch.device("cpu") if device == "cpu" else torch.device("cuda", torch.cuda.current_device())
        if model.rope_scaling.type != "none":  # Megatron's RotaryEmbedding has no such scaling
            chunk.rotary_pos_emb.inv_freq = rope_inv_freq(model).to(chunk.rotary_pos_emb.inv_freq.device)
        if reset_position_ids:
            rope_follows_position_ids(chunk)
        chunk.to(target)
        init_parameters(chunk, model, seed)
        chunks.append(chunk)
    return chunks


# ---------------------------------------------------------------------------------------------
# Layout-independent initialisation
# ---------------------------------------------------------------------------------------------

# attention and MLP output projections: the dense MLP's, each expert's and the shared expert's fc2
_OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "linear_fc2.weight")
_NORM_SUFFIXES = ("layer_norm_weight", "final_layernorm.weight", "norm.weight")


def _tensor_seed(seed: int, key: str, layer_offsets: tuple[int, ...]) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{layer_offsets}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sharded_tensors(sharded_sd):
    """Flatten a sharded state dict into its ShardedTensors, building factories (e.g. SwiGLU fc1)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    stack = [sharded_sd]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, ShardedTensorFactory):
            stack.append(node.build())
        elif isinstance(node, ShardedTensor):
            yield node


@torch.no_grad()
def init_parameters(chunk: GPTModel, model: ModelConfig, seed: int) -> None:
    """Draw every global tensor from a generator seeded by (seed, name, layer) and keep this rank's slice.

    Normal(0, std) weights (routers included), std / sqrt(2 * num_layers) for attention and MLP output
    projections (every expert's too),
    ones for RMSNorm weights (q/k norms included), zeros for biases (QKV). Each rank generates the
    full tensor of its layers (on its device), which costs a transient copy of one tensor and keeps
    init identical for any TP/PP/VPP. A tied output layer on the last pipeline stage is saved under
    the embedding's key, so it draws the embedding's values. `seed` is runtime.seed.
    """
    std = model.init_method_std
    out_std = std / math.sqrt(2.0 * model.num_layers) if model.scale_output_init else std
    seen: set[tuple] = set()
    for st in sharded_tensors(chunk.sharded_state_dict()):
        data = st.data
        if data is None or not data.is_floating_point():
            continue
        ident = (data.data_ptr(), tuple(data.shape), data.stride())
        if ident in seen:  # the same view can appear under two keys
            continue
        seen.add(ident)
        prefix_dims = st.prepend_axis_num
        layer_offsets = tuple(st.global_offset[:prefix_dims])
        global_shape = tuple(st.global_shape[prefix_dims:])
        offsets = st.global_offset[prefix_dims:]
        if st.key.endswith(_NORM_SUFFIXES):
            full = torch.ones(global_shape, dtype=torch.float32, device=data.device)
        elif st.key.endswith(".bias"):
            full = torch.zeros(global_shape, dtype=torch.float32, device=data.device)
        else:
            gen = torch.Generator(device=data.device)
            gen.manual_seed(_tensor_seed(seed, st.key, layer_offsets))
            scale = out_std if st.key.endswith(_OUTPUT_PROJECTIONS) else std
            full = torch.empty(global_shape, dtype=torch.float32, device=data.device)
            full.normal_(0.0, scale, generator=gen)
        local = full[tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))]
        data.copy_(local.to(data.dtype))

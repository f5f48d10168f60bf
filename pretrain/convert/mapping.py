"""Megatron-Core GPTModel <-> Hugging Face Llama, Mistral, Qwen2 and Qwen3, and their mixture-of-experts
forms Mixtral, Qwen2-MoE and Qwen3-MoE: one name table plus named transforms.

Every tensor of the model appears once in `RULES`: its Megatron checkpoint key (per-layer tensors
are stacked as [num_layers, ...] under one key, independent of TP/PP, unless layers differ: see
below), the Hugging Face name(s) it becomes, the transform between the two and, for tensors only some
families (or layers) have, the feature that brings it (`needs`: QKV biases for Qwen2, per-head q/k
norms for Qwen3, a separate output layer unless embeddings are tied, the dense MLP or the experts,
router and shared expert of an MoE layer). Both directions (`to_hf.py`, `from_hf.py`) read only this
table (through `global_rules` and `layer_rules`), so a new tensor or a renamed one is a one-line change
here. The four families share every other name, as Megatron-Bridge's Llama, Mistral and Qwen bridges
show.

The two non-trivial transforms (checked against logits, see tests/test_convert_to_hf.py):
- `qkv_per_group`: Megatron's fused QKV rows are grouped per query group — for each of G groups,
  H/G query heads, then one key head, then one value head, each head_dim rows. A split into thirds
  is wrong as soon as H != G. The QKV bias (Qwen2) is grouped the same way.
- `gate_up`: linear_fc1 of SwiGLU is [gate; up] along dim 0 (global, after the TP gather).
RoPE needs no permutation: Megatron's default rotate-half matches HF Llama.

Mixture of experts. Megatron keys each expert's tensors as one tensor with the global expert index as
a leading axis (`decoder.layers.mlp.experts.experts.linear_fc1.weight`: [layers, experts, 2F, H],
whether the experts run as SequentialMLP or grouped GEMM, at any EP/ETP); Hugging Face stores one
tensor per expert (`experts.{expert}.gate_proj` for Qwen, `block_sparse_moe.experts.{expert}.w1` for
Mixtral). A per-expert rule is therefore read and written one expert of one layer at a time. The router
is `mlp.router.weight` [experts, H] (HF `gate`), Qwen2-MoE's shared expert `mlp.shared_experts.*` with
its sigmoid gate `gate_weight` [1, H] (HF `shared_expert_gate`). An MoE layer's pre-MLP norm is
`pre_mlp_layernorm.weight` (HF `post_attention_layernorm`), as Transformer Engine layers and
Megatron-LM's MoE checkpoints key it (no fused fc1 to carry it); a dense layer's is
`mlp.linear_fc1.layer_norm_weight`. Megatron stacks per-layer tensors under one key only when all
layers are alike (`moe_layer_freq=1`, which kumihimo passes unless `model.moe.dense_first_layers`);
with a per-layer list it keys each layer by its number instead (`decoder.layers.3.mlp.router.weight`,
experts `decoder.layers.3.mlp.experts.experts.linear_fc1.weight` [experts, 2F, H]):
`LlamaDims.per_layer_keys`, `stored_key` and `stored_index` handle both.

Dense first layers. The first `dense_first_layers` layers of an MoE model keep the dense SwiGLU MLP
(`model.ffn_hidden_size` wide; the experts have their own width): their MLP rules are the dense
model's (`mlp.linear_fc1/linear_fc2` <-> `mlp.gate_proj/up_proj/down_proj`), the other layers' the
experts', so which rules a layer has depends on the layer (`layer_rules(dims, layer)`). Qwen3-MoE and
Qwen2-MoE name such layers in `mlp_only_layers` (a dense MLP of `intermediate_size`, experts of
`moe_intermediate_size`); Mixtral has no dense layers, so `to_hf` refuses them under Mixtral's names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kumihimo.pretrain.config import ModelConfig

# Megatron-LM and older kumihimo checkpoints prefix keys with DDP/Float16Module wrapper names.
WRAPPER_PREFIX = "module."
LAYER_PREFIX = "decoder.layers."
LAYER = "{layer}"
EXPERT = "{expert}"


@dataclass(frozen=True)
class LlamaDims:
    """The shapes conversion needs, from the model config and the vocabulary sizes."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    megatron_vocab_size: int
    """Rows of the Megatron embedding and output layer (padded for TP)."""
    hf_vocab_size: int
    """Rows on the Hugging Face side (the tokenizer's size, or the padded size when kept)."""
    qkv_bias: bool = False
    """Query/key/value projections have biases (Qwen2)."""
    qk_norm: bool = False
    """Per-head RMSNorm weights for queries and keys (Qwen3)."""
    tied_embeddings: bool = False
    """The output layer is the embedding (no output_layer / lm_head tensor)."""
    num_experts: int = 0
    """Routed experts of every layer's MLP; 0: dense SwiGLU MLPs."""
    expert_ffn_hidden_size: int = 0
    """Intermediate width of each expert (and of the dense MLP it replaces, for Mixtral)."""
    shared_expert_ffn_hidden_size: int = 0
    """Intermediate width of the shared expert (Qwen2-MoE); 0: none."""
    shared_expert_gate: bool = False
    """The shared expert's output is scaled by a sigmoid gate per token (Qwen2-MoE)."""
    expert_names: str = "qwen"
    """Hugging Face names of the MoE tensors: "qwen" (mlp.gate, mlp.experts.{e}.gate_proj/up_proj/
    down_proj) or "mixtral" (block_sparse_moe.gate, block_sparse_moe.experts.{e}.w1/w3/w2)."""
    dense_first_layers: int = 0
    """The first this many layers of an MoE model have a dense MLP of ffn_hidden_size, the rest experts
    (model.moe.dense_first_layers; Hugging Face's mlp_only_layers [0, ..., k-1])."""

    @classmethod
    def from_model(cls, model: ModelConfig, megatron_vocab_size: int, hf_vocab_size: int) -> LlamaDims:
        """The shapes of a model config with the two vocabulary sizes."""
        moe = getattr(model, "moe", None)
        experts = {}
        if moe is not None and moe.num_experts > 0:
            experts = dict(
                num_experts=moe.num_experts,
                dense_first_layers=moe.dense_first_layers,
                expert_ffn_hidden_size=moe.ffn_hidden_size or model.ffn_hidden_size,
                shared_expert_ffn_hidden_size=moe.shared_expert_ffn_hidden_size,
                shared_expert_gate=moe.shared_expert_gate,
                expert_names="mixtral" if model.hf_family in ("llama", "mistral") else "qwen",
            )
        return cls(
            num_layers=model.num_layers,
            hidden_size=model.hidden_size,
            ffn_hidden_size=model.ffn_hidden_size,
            num_attention_heads=model.num_attention_heads,
            num_query_groups=model.query_groups,
            head_dim=model.head_dim,
            megatron_vocab_size=megatron_vocab_size,
            hf_vocab_size=hf_vocab_size,
            qkv_bias=model.add_qkv_bias,
            qk_norm=model.qk_layernorm,
            tied_embeddings=model.tie_word_embeddings,
            **experts,
        )

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def moe(self) -> bool:
        return self.num_experts > 0

    @property
    def per_layer_keys(self) -> bool:
        """Megatron keys per-layer tensors by layer number (`decoder.layers.3.…`) instead of stacking
        them under one key with a leading layer axis: when layers differ (dense first layers)."""
        return self.moe and self.dense_first_layers > 0

    def moe_layer(self, layer: int) -> bool:
        """Layer `layer` (0-based) has experts; the dense first layers and a dense model's do not."""
        return self.moe and layer >= self.dense_first_layers


@dataclass(frozen=True)
class Transform:
    """A named, invertible mapping between one Megatron tensor and its Hugging Face tensor(s).

    `to_hf` returns views of its input where it can (from_hf.py then reads the Hugging Face tensors
    straight into those rows, see `hf_row_blocks`); rows of the Megatron tensor that `to_hf` drops
    (vocabulary padding) are zeros in what `from_hf` returns."""

    name: str
    to_hf: Callable[[torch.Tensor, LlamaDims], list[torch.Tensor]]
    from_hf: Callable[[list[torch.Tensor], LlamaDims], torch.Tensor]


def _identity_to_hf(tensor: torch.Tensor, dims: LlamaDims) -> list[torch.Tensor]:
    return [tensor]


def _identity_from_hf(tensors: list[torch.Tensor], dims: LlamaDims) -> torch.Tensor:
    return tensors[0]


def _vocab_to_hf(tensor: torch.Tensor, dims: LlamaDims) -> list[torch.Tensor]:
    # Padding rows exist only so each TP rank holds an equal slice; they are never trained on.
    return [tensor[: dims.hf_vocab_size]]


def _vocab_from_hf(tensors: list[torch.Tensor], dims: LlamaDims) -> torch.Tensor:
    (tensor,) = tensors
    missing = dims.megatron_vocab_size - tensor.shape[0]
    if missing == 0:
        return tensor
    # Zero rows: the padded ids never occur in data; zeros keep the padding easy to recognise.
    return torch.cat([tensor, tensor.new_zeros((missing, tensor.shape[1]))])


# Both work on the weight [rows, hidden] and on the bias [rows] (`rest` is () for the bias).
def _qkv_to_hf(tensor: torch.Tensor, dims: LlamaDims) -> list[torch.Tensor]:
    per_group, rest = dims.heads_per_group, tuple(tensor.shape[1:])
    grouped = tensor.view(dims.num_query_groups, per_group + 2, dims.head_dim, *rest)
    query = grouped[:, :per_group].reshape(dims.num_attention_heads * dims.head_dim, *rest)
    key = grouped[:, per_group].reshape(dims.num_query_groups * dims.head_dim, *rest)
    value = grouped[:, per_group + 1].reshape(dims.num_query_groups * dims.head_dim, *rest)
    return [query, key, value]


def _qkv_from_hf(tensors: list[torch.Tensor], dims: LlamaDims) -> torch.Tensor:
    query, key, value = tensors
    groups, head_dim, rest = dims.num_query_groups, dims.head_dim, tuple(query.shape[1:])
    grouped = torch.cat(
        [
            query.reshape(groups, dims.heads_per_group, head_dim, *rest),
            key.reshape(groups, 1, head_dim, *rest),
            value.reshape(groups, 1, head_dim, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *rest)


def _gate_up_to_hf(tensor: torch.Tensor, dims: LlamaDims) -> list[torch.Tensor]:
    gate, up = tensor.chunk(2, dim=0)
    return [gate, up]


def _gate_up_from_hf(tensors: list[torch.Tensor], dims: LlamaDims) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


TRANSFORMS = {
    t.name: t
    for t in (
        Transform("identity", _identity_to_hf, _identity_from_hf),
        Transform("vocab_rows", _vocab_to_hf, _vocab_from_hf),
        Transform("qkv_per_group", _qkv_to_hf, _qkv_from_hf),
        Transform("gate_up", _gate_up_to_hf, _gate_up_from_hf),
    )
}


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor (key without wrapper prefix) and the Hugging Face tensors it becomes."""

    megatron: str
    hf: tuple[str, ...]
    transform: str = "identity"
    needs: str | None = None
    """The feature (a key of FEATURES) the tensor exists under; None: every model has it."""

    def present(self, dims: LlamaDims, layer: int | None = None) -> bool:
        """The model has this tensor (in `layer`, for per-layer rules)."""
        return self.needs is None or FEATURES[self.needs](dims, layer)

    @property
    def per_layer(self) -> bool:
        return self.megatron.startswith(LAYER_PREFIX)

    @property
    def per_expert(self) -> bool:
        """One Hugging Face tensor per expert; Megatron's tensor has an expert axis after the layer."""
        return EXPERT in self.hf[0]

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [name.replace(LAYER, str(layer)).replace(EXPERT, str(expert)) for name in self.hf]


# feature -> whether a model (a layer of it, for the MLP's features) has it
FEATURES: dict[str, Callable[[LlamaDims, int | None], bool]] = {
    "qkv_bias": lambda dims, layer: dims.qkv_bias,
    "qk_norm": lambda dims, layer: dims.qk_norm,
    "untied": lambda dims, layer: not dims.tied_embeddings,
    "dense_mlp": lambda dims, layer: not dims.moe_layer(layer),
    "moe_mlp": lambda dims, layer: dims.moe_layer(layer),
    "qwen_experts": lambda dims, layer: dims.moe_layer(layer) and dims.expert_names == "qwen",
    "mixtral_experts": lambda dims, layer: dims.moe_layer(layer) and dims.expert_names == "mixtral",
    "shared_expert": lambda dims, layer: dims.moe_layer(layer) and dims.shared_expert_ffn_hidden_size > 0,
    "shared_expert_gate": lambda dims, layer: dims.moe_layer(layer) and dims.shared_expert_gate,
}


_ATTN = "model.layers.{layer}.self_attn."
_MLP = "model.layers.{layer}.mlp."
_QWEN_EXPERT = _MLP + "experts.{expert}."
_MIXTRAL = "model.layers.{layer}.block_sparse_moe."
_MIXTRAL_EXPERT = _MIXTRAL + "experts.{expert}."
_EXPERTS = "decoder.layers.mlp.experts.experts."
_SHARED = "decoder.layers.mlp.shared_experts."

# Order is the order tensors are read and written (embedding, layer by layer, final norm, head).
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab_rows"),
    Rule(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        ("model.layers.{layer}.input_layernorm.weight",),
    ),
    Rule(
        "decoder.layers.self_attention.linear_qkv.weight",
        (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"),
        "qkv_per_group",
    ),
    Rule(
        "decoder.layers.self_attention.linear_qkv.bias",
        (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"),
        "qkv_per_group",
        needs="qkv_bias",
    ),
    Rule("decoder.layers.self_attention.q_layernorm.weight", (_ATTN + "q_norm.weight",), needs="qk_norm"),
    Rule("decoder.layers.self_attention.k_layernorm.weight", (_ATTN + "k_norm.weight",), needs="qk_norm"),
    Rule("decoder.layers.self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",)),
    Rule(
        "decoder.layers.mlp.linear_fc1.layer_norm_weight",
        ("model.layers.{layer}.post_attention_layernorm.weight",),
        needs="dense_mlp",
    ),
    Rule(
        "decoder.layers.pre_mlp_layernorm.weight",
        ("model.layers.{layer}.post_attention_layernorm.weight",),
        needs="moe_mlp",
    ),
    Rule(
        "decoder.layers.mlp.linear_fc1.weight",
        (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"),
        "gate_up",
        needs="dense_mlp",
    ),
    Rule("decoder.layers.mlp.linear_fc2.weight", (_MLP + "down_proj.weight",), needs="dense_mlp"),
    Rule("decoder.layers.mlp.router.weight", (_MLP + "gate.weight",), needs="qwen_experts"),
    Rule(
        _EXPERTS + "linear_fc1.weight",
        (_QWEN_EXPERT + "gate_proj.weight", _QWEN_EXPERT + "up_proj.weight"),
        "gate_up",
        needs="qwen_experts",
    ),
    Rule(_EXPERTS + "linear_fc2.weight", (_QWEN_EXPERT + "down_proj.weight",), needs="qwen_experts"),
    Rule("decoder.layers.mlp.router.weight", (_MIXTRAL + "gate.weight",), needs="mixtral_experts"),
    Rule(
        _EXPERTS + "linear_fc1.weight",
        (_MIXTRAL_EXPERT + "w1.weight", _MIXTRAL_EXPERT + "w3.weight"),
        "gate_up",
        needs="mixtral_experts",
    ),
    Rule(_EXPERTS + "linear_fc2.weight", (_MIXTRAL_EXPERT + "w2.weight",), needs="mixtral_experts"),
    Rule(
        _SHARED + "linear_fc1.weight",
        (_MLP + "shared_expert.gate_proj.weight", _MLP + "shared_expert.up_proj.weight"),
        "gate_up",
        needs="shared_expert",
    ),
    Rule(_SHARED + "linear_fc2.weight", (_MLP + "shared_expert.down_proj.weight",), needs="shared_expert"),
    Rule(_SHARED + "gate_weight", (_MLP + "shared_expert_gate.weight",), needs="shared_expert_gate"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), "vocab_rows", needs="untied"),
)


def global_rules(dims: LlamaDims) -> tuple[Rule, ...]:
    """The model's whole tensors (embedding, final norm, output layer unless tied), in table order."""
    return tuple(r for r in RULES if not r.per_layer and r.present(dims))


def layer_rules(dims: LlamaDims, layer: int) -> tuple[Rule, ...]:
    """The per-layer tensors of layer `layer` (0-based), in table order: a dense first layer of an MoE
    model has the dense MLP's, the others the experts'."""
    return tuple(r for r in RULES if r.per_layer and r.present(dims, layer))


def stored_key(rule: Rule, dims: LlamaDims, layer: int | None = None) -> str:
    """The checkpoint key of `rule`'s tensor (of `layer`'s, when layers are keyed by number)."""
    if dims.per_layer_keys and rule.per_layer:
        return f"{LAYER_PREFIX}{layer}.{rule.megatron[len(LAYER_PREFIX) :]}"
    return rule.megatron


def stored_index(rule: Rule, dims: LlamaDims, layer: int | None = None, expert: int | None = None):
    """Leading indices of one layer's (one expert's) slice in the stored tensor: (layer,) when layers
    are stacked, then (expert,) for per-expert rules; () for a whole tensor."""
    index = (layer,) if rule.per_layer and not dims.per_layer_keys else ()
    return (*index, expert) if rule.per_expert else index


def stored_shape(rule: Rule, dims: LlamaDims) -> tuple[int, ...]:
    """Global shape of the stored tensor: `megatron_shape` behind the layer and expert axes it has."""
    leading = (dims.num_layers,) if rule.per_layer and not dims.per_layer_keys else ()
    if rule.per_expert:
        leading = (*leading, dims.num_experts)
    return (*leading, *megatron_shape(rule, dims))


def megatron_shape(rule: Rule, dims: LlamaDims) -> tuple[int, ...]:
    """Shape of one layer's slice (per-layer rules; one expert's for per-expert rules) or of the whole
    tensor (global rules)."""
    hidden = dims.hidden_size
    qkv_rows = (dims.num_attention_heads + 2 * dims.num_query_groups) * dims.head_dim
    shapes = {
        "embedding.word_embeddings.weight": (dims.megatron_vocab_size, hidden),
        "output_layer.weight": (dims.megatron_vocab_size, hidden),
        "decoder.final_layernorm.weight": (hidden,),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (hidden,),
        "decoder.layers.self_attention.linear_qkv.weight": (qkv_rows, hidden),
        "decoder.layers.self_attention.linear_qkv.bias": (qkv_rows,),
        "decoder.layers.self_attention.q_layernorm.weight": (dims.head_dim,),
        "decoder.layers.self_attention.k_layernorm.weight": (dims.head_dim,),
        "decoder.layers.self_attention.linear_proj.weight": (
            hidden,
            dims.num_attention_heads * dims.head_dim,
        ),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (hidden,),
        "decoder.layers.pre_mlp_layernorm.weight": (hidden,),
        "decoder.layers.mlp.linear_fc1.weight": (2 * dims.ffn_hidden_size, hidden),
        "decoder.layers.mlp.linear_fc2.weight": (hidden, dims.ffn_hidden_size),
        "decoder.layers.mlp.router.weight": (dims.num_experts, hidden),
        _EXPERTS + "linear_fc1.weight": (2 * dims.expert_ffn_hidden_size, hidden),
        _EXPERTS + "linear_fc2.weight": (hidden, dims.expert_ffn_hidden_size),
        _SHARED + "linear_fc1.weight": (2 * dims.shared_expert_ffn_hidden_size, hidden),
        _SHARED + "linear_fc2.weight": (hidden, dims.shared_expert_ffn_hidden_size),
        _SHARED + "gate_weight": (1, hidden),
    }
    return shapes[rule.megatron]


def hf_shapes(rule: Rule, dims: LlamaDims) -> list[tuple[int, ...]]:
    """Shapes of the Hugging Face tensors `rule` produces (one layer's for per-layer rules)."""
    meta = torch.empty(megatron_shape(rule, dims), device="meta")
    return [tuple(t.shape) for t in TRANSFORMS[rule.transform].to_hf(meta, dims)]


def hf_row_blocks(rule: Rule, dims: LlamaDims) -> list[tuple[int, int]] | None:
    """Where each Hugging Face tensor of `rule` sits in the Megatron tensor (one layer's slice), as
    (first row, number of rows), when every one is a block of consecutive rows (identity, gate_up,
    vocab_rows; qkv_per_group with one query group); None when rows interleave (qkv_per_group)."""
    full = torch.empty(megatron_shape(rule, dims), device="meta")
    row_elements = full[0].numel()
    blocks = []
    for part in TRANSFORMS[rule.transform].to_hf(full, dims):
        is_view = part is full or part._base is full  # a reshape that had to copy has no base
        if not (is_view and part.is_contiguous() and part.shape[1:] == full.shape[1:]):
            return None
        blocks.append((part.storage_offset() // row_elements, part.shape[0]))
    return blocks


def strip_wrapper_prefix(key: str) -> str:
    while key.startswith(WRAPPER_PREFIX):
        key = key[len(WRAPPER_PREFIX) :]
    return key

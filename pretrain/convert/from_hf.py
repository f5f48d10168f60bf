"""Hugging Face Llama, Mistral, Qwen2 or Qwen3 model -> kumihimo checkpoint for continual pretraining.

The family comes from config.json (`model_type`, checked against `architectures`); what the kumihimo
model cannot represent (sliding-window attention, other RoPE scalings, biases beyond Qwen2's QKV
bias, non-SwiGLU activations) is refused with the config.json key that says so (`check_supported`).

The output is a checkpoint folder like the trainer's (`<output>/iter_0000000/` + the latest marker)
holding model weights only (no optimizer, scheduler or RNG state; kumihimo.json says
`"weights_only": true`), a run_config.yaml whose model section is derived from config.json and whose
parallelism is the target TP/PP, and the model's tokenizer under tokenizer/ (its SentencePiece
`tokenizer.model`, or else its Hugging Face tokenizer.json with the files beside it that decide the ids).
The vocabulary is the tokenizer's, padded for the target TP as the trainer pads it (`vocab_sizes`).

No model is built and no process group is started. The torch_dist files are what
`dist_checkpointing.save` writes for the trainer's GPTModel at TP=1/PP=1 (same keys, stacked
[num_layers, ...] shapes or, with dense first layers, each layer's own keys, dtypes, chunks, per-layer
`_extra_state` objects and common state; a test compares them with a save from the real model), so the
checkpoint loads at any TP/PP. Every name, shape and chunk follows from config.json and the table in
`pretrain.convert.mapping`, so the torch.distributed.checkpoint metadata is planned up front; the data
of each chunk (one layer's slice of a tensor, or the embedding) is read from the safetensors files only
when the writer asks for it, written, and dropped. Host memory therefore stays near the largest single
tensor (the embedding), whatever the model size. The folder is written under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.progress import Progress
from kumihimo.pretrain import checkpoint_format
from kumihimo.pretrain.config import TrainConfig, check_model_fits_layout
from kumihimo.pretrain.convert.dcp_files import (
    copy_hf_tokenizer,
    pickled_object,
    plain_tensor_properties,
    save_streamed,
    staged_output,
    weights_only_meta,
)
from kumihimo.pretrain.convert.mapping import (
    TRANSFORMS,
    LlamaDims,
    Rule,
    global_rules,
    hf_row_blocks,
    hf_shapes,
    layer_rules,
    megatron_shape,
    stored_index,
    stored_key,
    stored_shape,
)
from kumihimo.pretrain.integrity import is_finite
from kumihimo.pretrain.parallel import padded_vocab_size

log = stage_logger("convert")

HF_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
# config.json model_type -> the architectures entry it must come with
FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# A mixture-of-experts family is its dense family (model.family: attention, norms, names) plus model.moe.
MOE_FAMILIES = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3", "yarn": "yarn"}
TOKENIZER_DIR = "tokenizer"


@dataclass
class HFModel:
    folder: Path
    config: dict[str, Any]
    weight_files: dict[str, Path]  # tensor name -> safetensors file

    @property
    def dtype(self) -> torch.dtype:
        name = self.config.get("torch_dtype") or self.config.get("dtype") or "float32"
        return HF_DTYPES.get(name, torch.float32)


REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)
"""config.json keys every supported family has, read before any weight is (a KeyError otherwise)."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); fix it or download the model again") from exc


def read_hf_model(folder: Path) -> HFModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json; pass a Hugging Face model folder")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a JSON object; pass a Hugging Face model folder")
    for key in REQUIRED_CONFIG_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{config_path}: {key}={value!r} is not a positive integer; fix config.json")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        listing = _read_json(index)
        weight_map = listing.get("weight_map") if isinstance(listing, dict) else None
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map object; download the model again")
        files = {name: folder / file for name, file in weight_map.items()}
    elif (folder / "model.safetensors").is_file():
        files = {
            name: folder / "model.safetensors"
            for name in read_safetensors_header(folder / "model.safetensors")
        }
    else:
        raise UserError(
            f"{folder} has no safetensors weights (model.safetensors or its index); convert "
            "pytorch_model.bin to safetensors first"
        )
    missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
    if missing:
        raise UserError(
            f"{folder} lacks weight file(s) {', '.join(missing)} named in its index; download them"
        )
    return HFModel(folder, config, files)


def _supported_list() -> str:
    return ", ".join(f"{arch} (model_type {name!r})" for name, arch in FAMILIES.items())


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of config.json: transformers 5's rope_parameters or 4.x's rope_scaling."""
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def check_supported(config: dict[str, Any]) -> str:
    """The model's family; refuses what the Megatron side cannot represent, naming the config.json key."""
    family = config.get("model_type")
    if family not in FAMILIES:
        raise UserError(
            f"config.json model_type={family!r} is not supported; supported families: {_supported_list()}"
        )
    architectures = config.get("architectures") or [FAMILIES[family]]
    if architectures != [FAMILIES[family]]:
        raise UserError(
            f"config.json architectures={architectures} is not {[FAMILIES[family]]} (model_type {family!r}); "
            f"only the causal-LM heads are supported: {_supported_list()}"
        )
    problems = {
        "hidden_act": (config.get("hidden_act", "silu") != "silu", "needs silu (SwiGLU)"),
        "attention_bias": (
            bool(config.get("attention_bias")),
            "adds biases to o_proj too; only Qwen2's q/k/v biases are supported",
        ),
        "mlp_bias": (bool(config.get("mlp_bias")), "MLP biases are not supported"),
        "use_sliding_window": (
            bool(config.get("use_sliding_window")),
            "sliding-window attention is not supported; only full attention",
        ),
    }
    window, max_positions = config.get("sliding_window"), config.get("max_position_embeddings")
    if family in ("mistral", "mixtral") and window is not None:
        problems["sliding_window"] = (
            max_positions is None or window < max_positions,
            f"is {window}, below max_position_embeddings={max_positions}: sliding-window attention is not "
            "supported (a window >= the context, or null, is full attention)",
        )
    layer_types = config.get("layer_types") or []
    problems["layer_types"] = (
        any(kind != "full_attention" for kind in layer_types),
        "has non-full-attention layers; only full attention is supported",
    )
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems["rope_scaling"] = (
        rope_type not in ROPE_TYPES,
        f"type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}",
    )
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    problems["partial_rotary_factor"] = (factor != 1.0, f"is {factor}: only full-dimension RoPE is supported")
    if family in MOE_FAMILIES:
        problems.update(moe_problems(config))
    for key, (bad, why) in problems.items():
        if bad:
            raise UserError(f"config.json {key} {why}; this model cannot be converted")
    return family


DENSE_LAYERS_SUPPORTED = (
    "only dense first layers are supported (mlp_only_layers [0, ..., k-1] with decoder_sparse_step 1: "
    "kumihimo's model.moe.dense_first_layers=k)"
)


def dense_first_layers(config: dict[str, Any]) -> int | None:
    """k when config.json's dense layers (Qwen*-MoE's mlp_only_layers) are the first k, as a set (a
    layer is dense when listed); None for any other pattern."""
    layers = config.get("mlp_only_layers") or []
    if not isinstance(layers, list) or not all(type(layer) is int for layer in layers):
        return None
    dense = set(layers)
    return len(dense) if dense == set(range(len(dense))) else None


def moe_problems(config: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """What an MoE config.json may say that the Megatron MoE layer cannot represent."""
    family = config["model_type"]
    step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers")
    num_layers, first_dense = config["num_hidden_layers"], dense_first_layers(config)
    problems = {
        "decoder_sparse_step": (
            step != 1,
            f"is {step} (layer i has experts only when (i + 1) % {step} == 0): {DENSE_LAYERS_SUPPORTED}",
        ),
        "mlp_only_layers": (
            first_dense is None or first_dense >= num_layers,
            f"is {dense}: "
            + (
                DENSE_LAYERS_SUPPORTED
                if first_dense is None
                else f"every one of the {num_layers} layers is dense, which is not a mixture of experts"
            ),
        ),
        "num_experts_per_tok": (
            not isinstance(config.get("num_experts_per_tok"), int),
            "is missing: the number of experts per token is needed",
        ),
    }
    if family == "qwen2_moe":
        problems["shared_expert_intermediate_size"] = (
            not config.get("shared_expert_intermediate_size"),
            "is 0 or missing: Qwen2-MoE always has a shared expert",
        )
    return problems


def moe_section(config: dict[str, Any]) -> dict[str, Any]:
    """The model.moe section of an MoE config.json (the routing of Mixtral and Qwen*-MoE as Megatron
    computes it: top-k then softmax over the k = norm_topk_prob; softmax then top-k unnormalised = not)."""
    family = config["model_type"]
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not isinstance(experts, int) or experts < 1:
        raise UserError(f"config.json num_experts={experts!r} is not a positive integer; fix config.json")
    section: dict[str, Any] = {
        "num_experts": experts,
        "router_topk": config["num_experts_per_tok"],
        "ffn_hidden_size": config["intermediate_size"]
        if family == "mixtral"
        else config["moe_intermediate_size"],
        # Mixtral renormalises over the chosen experts; Qwen*-MoE does so when norm_topk_prob is true.
        "router_pre_softmax": family != "mixtral" and not config.get("norm_topk_prob", False),
        "aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.0)),
        # Qwen*-MoE's mlp_only_layers [0, ..., k-1]: MLPs of intermediate_size (model.ffn_hidden_size)
        "dense_first_layers": dense_first_layers(config) or 0,
    }
    if family == "qwen2_moe":
        section["shared_expert_ffn_hidden_size"] = config["shared_expert_intermediate_size"]
        section["shared_expert_gate"] = True
    return section


def rope_scaling(config: dict[str, Any]) -> dict[str, Any]:
    """The model.rope_scaling section for config.json's RoPE settings (as transformers reads them)."""
    rope = rope_parameters(config)
    kind = ROPE_TYPES[rope.get("rope_type", rope.get("type", "default"))]
    if kind == "none":
        return {"type": "none"}
    original = rope.get("original_max_position_embeddings") or config.get("max_position_embeddings")
    factor = rope.get("factor")
    if factor is None and kind == "yarn" and rope.get("original_max_position_embeddings"):
        # as transformers reads YaRN without a factor: the context extension it declares
        factor = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
    if factor is None:
        raise UserError(
            f"config.json's RoPE settings ({kind}) have no factor"
            + (" and no original_max_position_embeddings to derive it from" if kind == "yarn" else "")
            + "; add the factor the model was trained with to rope_scaling/rope_parameters"
        )
    section: dict[str, Any] = {"type": kind, "factor": float(factor)}
    if kind == "llama3":
        section.update(
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(original),
        )
    elif kind == "yarn":
        section.update(
            original_max_position_embeddings=int(original),
            beta_fast=float(rope.get("beta_fast") or 32.0),  # `or`: transformers treats 0/null as unset
            beta_slow=float(rope.get("beta_slow") or 1.0),
            truncate=bool(rope.get("truncate", True)),
        )
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if rope.get(key) is not None:
                section[key] = float(rope[key])
    return section


def rope_theta(config: dict[str, Any]) -> int:
    theta = rope_parameters(config).get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise UserError(f"config.json rope_theta={theta} is not an integer, which model.rotary_base needs")
    return int(theta)


# Training sequence length of an import's run_config.yaml when config.json declares a longer context
# (Llama 3.1: 131072): the length Llama 3 was pretrained at and Swallow continues at.
IMPORT_SEQ_LENGTH = 8192
# Peak learning rate an import's run_config.yaml starts from (Swallow's Llama 3.1 8B continual
# pretraining, configs/pretrain/swallow-llama3.1-8b.yaml), min_lr a tenth of it.
CONTINUAL_LR = 2.5e-5


def train_config(hf: HFModel, tp: int, pp: int, tokenizer_path: Path | None, ep: int = 1):
    """The TrainConfig whose model is the Hugging Face model, laid out for TP x PP (x EP)."""
    c = hf.config
    moe_family = check_supported(c)
    family = MOE_FAMILIES.get(moe_family, moe_family)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    max_positions = int(c.get("max_position_embeddings") or IMPORT_SEQ_LENGTH)
    if max_positions > IMPORT_SEQ_LENGTH:
        log.info(
            f"run_config.yaml: model.seq_length={IMPORT_SEQ_LENGTH} for training (config.json "
            f"max_position_embeddings={max_positions} is kept as model.max_position_embeddings and goes back "
            "on export); set model.seq_length to the sequence length you continue at"
        )
    model = {
        "num_layers": c["num_hidden_layers"],
        "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"],
        "num_attention_heads": heads,
        "num_query_groups": c.get("num_key_value_heads") or heads,
        "kv_channels": None if head_dim * heads == c["hidden_size"] else head_dim,
        "seq_length": min(max_positions, IMPORT_SEQ_LENGTH),
        "max_position_embeddings": max_positions,
        "rotary_base": rope_theta(c),
        "rope_scaling": rope_scaling(c),
        "add_qkv_bias": family == "qwen2",
        "qk_layernorm": family == "qwen3",
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "family": family,
        "norm_epsilon": c.get("rms_norm_eps", 1e-5),
        "init_method_std": c.get("initializer_range", 0.02),
    }
    parallelism = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    if moe_family in MOE_FAMILIES:
        model["moe"] = moe_section(c)
        parallelism["expert_model_parallel_size"] = ep
        if tp > 1:  # Megatron-Core runs MoE under TP only with sequence parallelism
            parallelism["sequence_parallel"] = True
    elif ep != 1:
        raise UserError(f"--ep={ep} needs a mixture-of-experts model; {hf.folder} is dense: use --ep 1")
    data = {
        "name": hf.folder.name,
        # continual-pretraining defaults, not from-scratch ones (override any of them at train)
        "output_dir": f"runs/{hf.folder.name}-continued",
        "optimizer": {"lr": CONTINUAL_LR, "min_lr": CONTINUAL_LR / 10},
        "model": model,
        "parallelism": parallelism,
        # bf16 training for 16-bit models; fp32 checkpoints (tests, tiny models) stay fp32.
        "precision": {"params_dtype": "fp32" if hf.dtype == torch.float32 else "bf16"},
        "data": {"tokenizer": str(tokenizer_path) if tokenizer_path else None},
    }
    config = configtree.from_dict(TrainConfig, data)
    config.model.validate()
    check_model_fits_layout(config.model, config.parallelism)
    return config


def resolve_tokenizer(hf: HFModel, output_root: Path, staging_root: Path):
    """Copy the model's tokenizer beside the checkpoint; returns (tokenizer | None, its final path).

    A SentencePiece `tokenizer.model` is copied when the folder has one (as before); otherwise a Hugging
    Face tokenizer (tokenizer.json) is, as its identity files plus config.json (tokenizer.hf decides the
    kind by the same files, so the trainer loads the copy as the same kind). The returned tokenizer is
    loaded from the copy, so the identity recorded is that of the files the trainer will read."""
    from kumihimo.tokenizer.base import load_tokenizer
    from kumihimo.tokenizer.hf import HF_TOKENIZER_FILE
    from kumihimo.tokenizer.spm import MODEL_FILENAME

    target = staging_root / TOKENIZER_DIR
    if (hf.folder / MODEL_FILENAME).is_file():
        target.mkdir()
        shutil.copyfile(hf.folder / MODEL_FILENAME, target / MODEL_FILENAME)
        return load_tokenizer(target / MODEL_FILENAME), (
            output_root / TOKENIZER_DIR / MODEL_FILENAME
        ).resolve()
    if (hf.folder / HF_TOKENIZER_FILE).is_file():
        copy_hf_tokenizer(hf.folder, target, extra=("config.json",))
        return load_tokenizer(target), (output_root / TOKENIZER_DIR).resolve()
    log.info(
        f"warning: {hf.folder} has neither a SentencePiece {MODEL_FILENAME} nor a Hugging Face "
        f"{HF_TOKENIZER_FILE}; run_config.yaml gets data.tokenizer=null: set it to the model's tokenizer "
        "before training"
    )
    return None, None


def vocab_sizes(hf: HFModel, tokenizer, tp: int, divisible_by: int) -> tuple[int, int, int]:
    """(vocab size, padded size, make_vocab_size_divisible_by) as the trainer will compute them.

    The trainer's vocabulary is the tokenizer's (SentencePiece pieces, or len(tokenizer) of a Hugging Face
    one), padded to a multiple of divisible_by x TP. Models often have more embedding rows than their
    tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens); so that those rows are kept (and go back to
    config.json's vocab_size on export), divisible_by is doubled until the padded vocabulary holds them
    (Qwen2.5 at 128 x TP=1: 151,680 < 151,936, so 512: 152,064). run_config.yaml records the
    divisible_by used, so a run started from it pads to the same size."""
    hf_vocab = hf.config["vocab_size"]
    vocab = tokenizer.vocab_size if tokenizer is not None else hf_vocab
    if vocab > hf_vocab:
        raise UserError(
            f"the tokenizer has {vocab} tokens but config.json vocab_size is {hf_vocab}; the folder's "
            "tokenizer does not belong to the model: put the model's own tokenizer files beside its weights"
        )
    chosen = divisible_by
    while padded_vocab_size(vocab, chosen, tp) < hf_vocab:
        chosen *= 2
    if chosen != divisible_by:
        log.info(
            f"config.json vocab_size={hf_vocab} exceeds the tokenizer's {vocab} tokens padded to "
            f"{padded_vocab_size(vocab, divisible_by, tp)} (model.make_vocab_size_divisible_by={divisible_by} x "
            f"TP={tp}); run_config.yaml sets model.make_vocab_size_divisible_by={chosen} so that the extra "
            "rows are kept: train with that value"
        )
    return vocab, padded_vocab_size(vocab, chosen, tp), chosen


# ---------------------------------------------------------------------------------------------
# Reading Hugging Face safetensors one tensor (or a block of its rows) at a time
# ---------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
}
MAX_HEADER_BYTES = 100 * 2**20
CONVERT_BLOCK_BYTES = 64 * 2**20  # rows converted at a time when the file's dtype is not the output's


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    dtype_name: str
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file
    num_bytes: int

    @property
    def dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype_name)


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file (8-byte little-endian header size, JSON header, data)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        raw = handle.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
    try:
        header = json.loads(raw)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header cannot be read); download it again")
    header.pop("__metadata__", None)
    return {
        name: StoredTensor(
            path,
            info["dtype"],
            tuple(info["shape"]),
            8 + size + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in header.items()
    }


def _read_exactly(handle, tensor: torch.Tensor, what: str) -> None:
    """Fill the contiguous `tensor` with the next bytes of the file (reads may come back short)."""
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    filled = 0
    while filled < len(buffer):
        count = handle.readinto(buffer[filled:])
        if not count:
            raise UserError(f"{handle.name} ends inside {what}; the file is truncated, download it again")
        filled += count


class HFTensors:
    """Tensors of a Hugging Face model: names, shapes and dtypes from the safetensors headers, data
    read on request straight into the caller's buffer (no memory map, no intermediate copy)."""

    # Buffers some exporters save; they are recomputed, not weights.
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, hf: HFModel):
        if sys.byteorder != "little":  # safetensors stores little-endian bytes
            raise UserError("converting from safetensors needs a little-endian machine")
        self.hf = hf
        headers = {path: read_safetensors_header(path) for path in sorted(set(hf.weight_files.values()))}
        self.stored: dict[str, StoredTensor] = {}
        for name, path in hf.weight_files.items():
            if name not in headers[path]:
                raise UserError(f"{path} lacks tensor {name} that its index names; download the model again")
            self.stored[name] = headers[path][name]

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Before anything is written: every expected tensor is there with its shape and a float
        dtype, and nothing else is (extra tensors mean an architecture the table cannot hold)."""
        ignored = set()
        if "lm_head.weight" not in expected and "lm_head.weight" in self.stored:
            # Tied embeddings: transformers replaces a saved lm_head by embed_tokens when loading.
            log.info("note: lm_head.weight is ignored: the model ties it to embed_tokens")
            ignored.add("lm_head.weight")
        unused = sorted(
            n
            for n in self.stored
            if n not in expected and n not in ignored and not n.endswith(self.IGNORED_SUFFIXES)
        )
        if unused:
            raise UserError(
                f"unsupported architecture: {', '.join(unused[:3])} have no place in the kumihimo "
                "model (biases other than Qwen2's q/k/v, MoE or extra modules cannot be converted)"
            )
        for name, shape in expected.items():
            stored = self.stored.get(name)
            if stored is None:
                raise UserError(
                    f"{self.hf.folder} lacks tensor {name}; it is not a complete "
                    f"{self.hf.config.get('model_type')} model: download all its weight files again"
                )
            if stored.shape != tuple(shape):
                raise UserError(
                    f"{name} has shape {list(stored.shape)} but config.json implies {list(shape)}; "
                    "use the config.json that came with these weights"
                )
            if stored.dtype is None:
                raise UserError(
                    f"{name} is stored as {stored.dtype_name}; only {', '.join(SAFETENSORS_DTYPES)} "
                    "weights can be converted; save the model in one of those dtypes first"
                )
            if stored.num_bytes != torch.Size(shape).numel() * stored.dtype.itemsize:
                raise UserError(
                    f"{stored.path} is damaged: {name} spans {stored.num_bytes} bytes, not what its "
                    "shape and dtype need; download it again"
                )

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored[name].shape

    def read_rows(self, name: str, first_row: int, out: torch.Tensor) -> None:
        """Rows [first_row, first_row + len(out)) of tensor `name` into the contiguous `out`, converted
        to out's dtype (in blocks, so a conversion never holds a second copy of the whole tensor)."""
        stored = self.stored[name]
        assert out.is_contiguous() and tuple(out.shape[1:]) == stored.shape[1:], (
            name,
            out.shape,
            stored.shape,
        )
        row_bytes = out[0].numel() * stored.dtype.itemsize
        with open(stored.path, "rb", buffering=0) as handle:
            handle.seek(stored.offset + first_row * row_bytes)
            if stored.dtype == out.dtype:
                _read_exactly(handle, out, name)
                return
            flat = out.reshape(-1)
            for block in flat.split(max(1, CONVERT_BLOCK_BYTES // stored.dtype.itemsize)):
                raw = torch.empty(block.numel(), dtype=stored.dtype)
                _read_exactly(handle, raw, name)
                block.copy_(raw)

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(self.shape(name), dtype=dtype)
        self.read_rows(name, 0, tensor)
        return tensor


# ---------------------------------------------------------------------------------------------
# The checkpoint plan: every chunk Megatron's save of the GPTModel at TP=1/PP=1 writes
# ---------------------------------------------------------------------------------------------

# Megatron saves SwiGLU's fc1 as its gate and up halves (a sharded-tensor factory): two chunks per layer
# (per expert of a layer for the experts).
ROW_SPLITS = {
    "decoder.layers.mlp.linear_fc1.weight": 2,
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": 2,
    "decoder.layers.mlp.shared_experts.linear_fc1.weight": 2,
}
# Per-layer linear layers with an `_extra_state` object (None for Megatron's local layers; GPTModel
# drops the output layer's). Stored pickled, as [object], under `<key>/shard_<layer>_<num_layers>`
# (stacked layers) or `decoder.layers.<layer>.<module>._extra_state/shard_0_1` (layers keyed by number);
# each expert's under `…/shard_<layer>.<expert>_<num_layers>.<num_experts>` (or `shard_<expert>_<num_experts>`).
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj")
DENSE_EXTRA_STATE_MODULES = ("mlp.linear_fc1", "mlp.linear_fc2")
EXPERT_EXTRA_STATE_MODULES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")
SHARED_EXTRA_STATE_MODULES = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
# dist_checkpointing.save stores what is not sharded (here only the content metadata) as this object.
COMMON_STATE_KEY = "common_state/shard_0_1"


@dataclass(frozen=True)
class Chunk:
    """One stored piece of the checkpoint: rows [start, stop) of `rule`'s tensor (of one layer's
    slice for per-layer rules, one expert's for per-expert rules), stored under `key` at the leading
    indices `index`; or, when `rule` is None, a pickled object."""

    key: str
    rule: Rule | None = None
    layer: int | None = None
    expert: int | None = None
    index: tuple[int, ...] = ()
    rows: tuple[int, int] = (0, 0)
    payload: Any = None
    ends_layer: bool = False


def extra_state_keys(dims: LlamaDims, layer: int) -> list[str]:
    """The `_extra_state` objects of one layer, as Megatron's sharded state dict names them."""
    modules = list(EXTRA_STATE_MODULES)
    moe_layer = dims.moe_layer(layer)
    if not moe_layer:  # a dense model's layer, or a dense first layer of an MoE model
        modules += DENSE_EXTRA_STATE_MODULES
    elif dims.shared_expert_ffn_hidden_size:
        modules += SHARED_EXTRA_STATE_MODULES
    if dims.per_layer_keys:
        keys = [f"decoder.layers.{layer}.{module}._extra_state/shard_0_1" for module in modules]
    else:
        keys = [f"decoder.layers.{module}._extra_state/shard_{layer}_{dims.num_layers}" for module in modules]
    for expert in range(dims.num_experts if moe_layer else 0):
        for module in EXPERT_EXTRA_STATE_MODULES:
            if dims.per_layer_keys:
                shard = f"shard_{expert}_{dims.num_experts}"
                keys.append(f"decoder.layers.{layer}.{module}._extra_state/{shard}")
            else:
                shard = f"shard_{layer}.{expert}_{dims.num_layers}.{dims.num_experts}"
                keys.append(f"decoder.layers.{module}._extra_state/{shard}")
    return keys


def plan_chunks(dims: LlamaDims) -> list[Chunk]:
    """Chunks in the order they are written (and the safetensors read): the embedding, layer by
    layer (expert by expert), the final norm, the head, the common state."""

    def tensor_chunks(rule: Rule, layer: int | None, expert: int | None = None) -> list[Chunk]:
        rows = megatron_shape(rule, dims)[0]
        parts = ROW_SPLITS.get(rule.megatron, 1)
        key, index = stored_key(rule, dims, layer), stored_index(rule, dims, layer, expert)
        return [
            Chunk(key, rule, layer, expert, index, (i * rows // parts, (i + 1) * rows // parts))
            for i in range(parts)
        ]

    first, *last = global_rules(dims)
    chunks = tensor_chunks(first, None)
    for layer in range(dims.num_layers):
        for rule in layer_rules(dims, layer):
            experts = range(dims.num_experts) if rule.per_expert else [None]
            for expert in experts:
                chunks += tensor_chunks(rule, layer, expert)
        keys = extra_state_keys(dims, layer)
        chunks += [Chunk(key, payload=None, ends_layer=key == keys[-1]) for key in keys]
    for rule in last:
        chunks += tensor_chunks(rule, None)
    chunks.append(
        Chunk(COMMON_STATE_KEY, payload={"content_metadata": dict(checkpoint_format.SHARDING_METADATA)})
    )
    return chunks


def write_item_for(chunk: Chunk, dims: LlamaDims, dtype: torch.dtype) -> WriteItem:
    if chunk.rule is None:
        return WriteItem(index=MetadataIndex(chunk.key), type=WriteItemType.BYTE_IO)
    shape = megatron_shape(chunk.rule, dims)
    start, stop = chunk.rows
    lead = len(chunk.index)
    size = stored_shape(chunk.rule, dims)
    offsets = (*chunk.index, start, *[0] * (len(shape) - 1))
    sizes = (*[1] * lead, stop - start, *shape[1:])
    if lead == 0:  # recorded as Megatron records a plain tensor (with its strides)
        properties = plain_tensor_properties(dtype, shape)
    else:  # a stacked [num_layers, ...] (or [experts, ...]) tensor, recorded like Megatron's (strides unset)
        properties = TensorProperties(dtype=dtype)
    offsets = torch.Size(offsets)
    return WriteItem(
        index=MetadataIndex(chunk.key, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets, torch.Size(sizes)),
            properties=properties,
            size=torch.Size(size),
        ),
    )


def expected_hf_tensors(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face tensor the table reads, with the shape config.json implies."""
    expected = {}
    for rule in global_rules(dims):
        expected.update(zip(rule.hf_names(), hf_shapes(rule, dims)))
    for layer in range(dims.num_layers):
        for rule in layer_rules(dims, layer):
            for expert in range(dims.num_experts) if rule.per_expert else [None]:
                expected.update(zip(rule.hf_names(layer, expert), hf_shapes(rule, dims)))
    return expected


def produce(chunk: Chunk, tensors: HFTensors, dims: LlamaDims, dtype: torch.dtype) -> torch.Tensor:
    """The data of one tensor chunk, in a tensor that owns exactly its own memory."""
    rule, (start, stop) = chunk.rule, chunk.rows
    shape = megatron_shape(rule, dims)
    names = rule.hf_names(chunk.layer, chunk.expert)
    blocks = hf_row_blocks(rule, dims)
    if blocks is None:  # rows interleave (QKV per group): read the parts, transform, keep the chunk's rows
        parts = [tensors.read(name, dtype) for name in names]
        data = TRANSFORMS[rule.transform].from_hf(parts, dims)
        del parts
        if (start, stop) != (0, shape[0]):
            data = data[start:stop].clone()
    else:  # each Hugging Face tensor is a block of rows: read it straight into place
        data = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        covered = sum(max(0, min(first + count, stop) - max(first, start)) for first, count in blocks)
        if covered < stop - start:
            data.zero_()  # rows no tensor fills (vocabulary padding) are zeros, as from_hf makes them
        for name, (first, count) in zip(names, blocks):
            low, high = max(first, start), min(first + count, stop)
            if low < high:
                tensors.read_rows(name, low - first, data[low - start : high - start])
    return data.view(*[1] * len(chunk.index), *data.shape)


# ---------------------------------------------------------------------------------------------
# Writing with torch.distributed.checkpoint, one chunk in memory at a time
# ---------------------------------------------------------------------------------------------


class _StreamingSavePlanner(DefaultSavePlanner):
    """Plans the chunks above without a state dict and makes each chunk's data only when asked."""

    def __init__(
        self, chunks: list[Chunk], tensors: HFTensors, dims: LlamaDims, dtype: torch.dtype, progress: Progress
    ):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items = [write_item_for(chunk, dims, dtype) for chunk in chunks]
        self.chunks = {item.index: chunk for item, chunk in zip(self.items, chunks)}
        self.tensors, self.dims, self.dtype, self.progress = tensors, dims, dtype, progress

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        chunk = self.chunks[write_item.index]  # MetadataIndex equality ignores the index hint
        if chunk.ends_layer:
            self.progress.update()
        if chunk.rule is None:
            return pickled_object(chunk.payload)
        data = produce(chunk, self.tensors, self.dims, self.dtype)
        # A NaN checkpoint would train NaN from step 1. is_finite reads the data once without a mask the
        # size of the tensor (isfinite(bf16) made a float copy too: 2.5x the chunk on top of it).
        if not bool(is_finite(data)):
            where = chunk.key if chunk.layer is None else f"{chunk.key} of layer {chunk.layer}"
            where += "" if chunk.expert is None else f", expert {chunk.expert}"
            raise UserError(
                f"the weights of {where} hold NaN or Inf values; the Hugging Face model is damaged, "
                "so nothing is written: download it again"
            )
        return data


def write_checkpoint(folder: Path, tensors: HFTensors, dims: LlamaDims, dtype: torch.dtype) -> int:
    """The torch_dist files and metadata.json of the weights; returns the bytes written."""
    with Progress("convert", total=dims.num_layers, unit="layers") as progress:
        return save_streamed(folder, _StreamingSavePlanner(plan_chunks(dims), tensors, dims, dtype, progress))


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def _meta(hf: HFModel, vocab: int, padded: int, tokenizer, tokenizer_path: Path | None) -> dict[str, Any]:
    identity = None
    if tokenizer is not None:
        identity = {**tokenizer.identity(), "path": str(tokenizer_path)}
    source = {
        "hf_model": str(hf.folder.resolve()),
        "hf_model_type": hf.config.get("model_type"),
        "hf_vocab_size": hf.config["vocab_size"],
        "hf_dtype": str(hf.dtype).removeprefix("torch."),
    }
    return weights_only_meta(vocab, padded, identity, source)


def convert_from_hf(
    model_dir: str | Path, output_dir: str | Path, tp: int = 1, pp: int = 1, ep: int = 1
) -> Path:
    """Write a weights-only kumihimo checkpoint root for a Hugging Face model of a supported family
    (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE); returns it.

    The run_config.yaml inside is laid out for TP x PP (x EP for MoE; the vocabulary padded for TP); the
    tensors themselves load at any layout.
    """
    hf = read_hf_model(Path(model_dir))
    check_supported(hf.config)
    tensors = HFTensors(hf)
    output_dir = Path(output_dir)
    started = time.monotonic()
    with staged_output(output_dir, "convert from-hf") as staging:
        tokenizer, tokenizer_path = resolve_tokenizer(hf, output_dir, staging)
        config = train_config(hf, tp, pp, tokenizer_path, ep)
        vocab, padded, divisible_by = vocab_sizes(
            hf, tokenizer, tp, config.model.make_vocab_size_divisible_by
        )
        config.model.make_vocab_size_divisible_by = divisible_by
        dims = LlamaDims.from_model(
            config.model, megatron_vocab_size=padded, hf_vocab_size=hf.config["vocab_size"]
        )
        tensors.check(expected_hf_tensors(dims))
        # fp16 is stored as fp32 (exact); bf16 and fp32 as they are, so a round trip is bit-identical.
        dtype = torch.bfloat16 if hf.dtype == torch.bfloat16 else torch.float32
        folder = checkpoint_format.iteration_dir(staging, 0)
        folder.mkdir()
        num_bytes = write_checkpoint(folder, tensors, dims, dtype)
        configtree.save(config, folder / checkpoint_format.CONFIG_FILE)
        meta = _meta(hf, vocab, padded, tokenizer, tokenizer_path)
        (folder / checkpoint_format.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / checkpoint_format.LATEST_FILE).write_text("0\n")
    elapsed = time.monotonic() - started
    log.info(
        f"wrote weights-only checkpoint {output_dir} ({num_bytes / 1e9:.2f} GB in {elapsed:.1f} s; "
        f"vocab {vocab} padded to {padded} for TP={tp}); continue pretraining from it with its "
        f"{checkpoint_format.CONFIG_FILE} plus your data.* settings"
    )
    return output_dir

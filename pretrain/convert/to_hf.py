"""Megatron torch_dist checkpoint -> Hugging Face Llama/Mistral/Qwen2/Qwen3 folder, on CPU, with no model.

The family is the model config's (`model.hf_family`: Qwen3 with q/k norms, Qwen2 with QKV biases,
else Llama, or what `convert from-hf` recorded); config.json carries what transformers and vLLM read
for it (architectures, model_type, RoPE scaling in both spellings, biases, tied embeddings).

The checkpoint's own run_config.yaml (the resolved TrainConfig) and kumihimo.json (vocabulary sizes,
tokenizer identity) say what the model is; nothing is guessed. Tensors are read straight from the
torch_dist files with torch.distributed.checkpoint (no process group, no Megatron model, any saved
TP/PP): one layer of the stacked [num_layers, ...] tensors (or of a layer's own tensor, when dense
first layers make Megatron key layers by number) at a time, transformed by the table in
`pretrain.convert.mapping` and appended to safetensors shards whose headers are planned up front.
Peak memory is therefore about two copies of the largest single tensor (the embedding), whatever the
model size. The folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.progress import Progress
from kumihimo.pretrain import checkpoint_format
from kumihimo.pretrain.config import from_saved
from kumihimo.pretrain.convert.dcp_files import (
    copy_hf_tokenizer,
    describe_failure,
    failure_cause,
    staged_output,
)
from kumihimo.pretrain.convert.mapping import (
    TRANSFORMS,
    LlamaDims,
    Rule,
    global_rules,
    hf_shapes,
    layer_rules,
    stored_index,
    stored_key,
    stored_shape,
    strip_wrapper_prefix,
)

log = stage_logger("convert")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's usual shard size
INDEX_FILE = "model.safetensors.index.json"
WRITE_BLOCK_ELEMENTS = 64 * 2**20
# Keys of model tensors (after stripping wrapper prefixes); everything else is optimizer/RNG state.
MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")


# ---------------------------------------------------------------------------------------------
# Reading regions of torch_dist tensors without a process group
# ---------------------------------------------------------------------------------------------


@dataclass
class Region:
    """A rectangular part of a saved tensor, read into `tensor` (shape = the region's size)."""

    key: str
    offsets: tuple[int, ...]
    tensor: torch.Tensor


def _overlap(start_a, size_a, start_b, size_b) -> tuple[list[int], list[int]] | None:
    starts = [max(a, b) for a, b in zip(start_a, start_b)]
    ends = [min(a + n, b + m) for a, n, b, m in zip(start_a, size_a, start_b, size_b)]
    if any(e <= s for s, e in zip(starts, ends)):
        return None
    return starts, [e - s for s, e in zip(starts, ends)]


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Plans reads of arbitrary regions (e.g. one layer of a stacked tensor): only the saved chunks
    that overlap a region are read, each straight into a view of the destination tensor."""

    def __init__(self, regions: dict[str, Region]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, region in self.regions.items():
            chunks = self.metadata.state_dict_metadata[region.key].chunks
            covered = 0
            for index, chunk in enumerate(chunks):
                found = _overlap(region.offsets, region.tensor.shape, chunk.offsets, chunk.sizes)
                if found is None:
                    continue
                starts, lengths = found
                covered += torch.Size(lengths).numel()
                items.append(
                    ReadItem(
                        type=LoadItemType.TENSOR,
                        dest_index=MetadataIndex(name, region.offsets),
                        dest_offsets=torch.Size(s - o for s, o in zip(starts, region.offsets)),
                        storage_index=MetadataIndex(region.key, chunk.offsets, index),
                        storage_offsets=torch.Size(s - o for s, o in zip(starts, chunk.offsets)),
                        lengths=torch.Size(lengths),
                    )
                )
            if covered != region.tensor.numel():  # chunks never overlap, so volumes add up
                raise UserError(
                    f"tensor {region.key} at offsets {region.offsets} is only partly stored in the "
                    "checkpoint (a shard is missing); the checkpoint is incomplete, use another one"
                )
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        tensor = self.regions[read_item.dest_index.fqn].tensor
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, start, length)
        return tensor

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor handed out a view, so the data is already in place


class _CachedMetadataReader(FileSystemReader):
    """Reads the (possibly large) .metadata file once instead of once per layer."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self._metadata = super().read_metadata()

    def read_metadata(self, *args: Any, **kwargs: Any):
        return self._metadata


class TorchDistReader:
    """Model tensors of one torch_dist checkpoint folder, by key without wrapper prefixes."""

    def __init__(self, folder: Path):
        if not (folder / ".metadata").is_file():
            raise UserError(
                f"{folder} has no torch_dist .metadata file: the checkpoint is incomplete or not a "
                "torch_dist checkpoint; pick another iteration"
            )
        self.folder = folder
        self._storage = _CachedMetadataReader(folder)
        entries = self._storage.read_metadata().state_dict_metadata
        self.tensors: dict[str, TensorStorageMetadata] = {}
        self._saved_keys: dict[str, str] = {}
        for saved_key, entry in entries.items():
            key = strip_wrapper_prefix(saved_key)
            if isinstance(entry, TensorStorageMetadata) and key.startswith(MODEL_KEY_PREFIXES):
                self.tensors[key] = entry
                self._saved_keys[key] = saved_key

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, requests: dict[str, tuple[str, Any]]) -> dict[str, torch.Tensor]:
        """{name: (key, index)} -> {name: tensor}; index None or () reads the whole tensor, a layer
        number (or a tuple of leading indices: layer, expert) one slice of it."""
        regions, leads = {}, {}
        for name, (key, index) in requests.items():
            index = () if index is None else (index,) if isinstance(index, int) else tuple(index)
            shape = self.shape(key)
            leads[name] = len(index)
            regions[name] = Region(
                self._saved_keys[key],
                (*index, *[0] * (len(shape) - len(index))),
                torch.empty((*[1] * len(index), *shape[len(index) :]), dtype=self.dtype(key)),
            )
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
                dcp.load(
                    {name: r.tensor for name, r in regions.items()},
                    storage_reader=self._storage,
                    planner=_RegionLoadPlanner(regions),
                    no_dist=True,
                )
        except CheckpointException as exc:
            cause = failure_cause(exc)
            if isinstance(cause, UserError):
                raise cause from None
            raise UserError(
                f"{self.folder} is incomplete or damaged ({describe_failure(cause)}); use another checkpoint"
            ) from exc
        return {name: r.tensor[(0,) * leads[name]] for name, r in regions.items()}


# ---------------------------------------------------------------------------------------------
# Streaming safetensors shards
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.num_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.num_bytes
    return shards


class StreamingSafetensorsWriter:
    """Writes planned tensors, in plan order, into sharded safetensors files plus the index.

    Because every name, shape and dtype is known before any data is read, each shard's header is
    written first and tensor bytes are appended as they arrive: nothing is buffered."""

    def __init__(self, folder: Path, tensors: list[PlannedTensor], max_shard_bytes: int):
        if sys.byteorder != "little":  # safetensors stores little-endian bytes
            raise UserError("converting to safetensors needs a little-endian machine")
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
        count = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._queue = [(shard_index, t) for shard_index, shard in enumerate(self.shards) for t in shard]
        self._position = 0
        self._handle = None
        self._open_shard = -1
        self.bytes_written = 0

    def _start_shard(self, shard_index: int) -> None:
        self._close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for tensor in self.shards[shard_index]:
            header[tensor.name] = {
                "dtype": SAFETENSORS_DTYPES[tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + tensor.num_bytes],
            }
            offset += tensor.num_bytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.folder / self.file_names[shard_index], "wb")  # noqa: SIM115 (closed in _close)
        self._handle.write(len(encoded).to_bytes(8, "little"))
        self._handle.write(encoded)
        self._open_shard = shard_index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, planned = self._queue[self._position]
        assert planned.name == name, f"tensors out of plan order: got {name}, expected {planned.name}"
        assert tuple(tensor.shape) == planned.shape, f"{name}: shape {tuple(tensor.shape)} != {planned.shape}"
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        # In blocks: a dtype change (or a non-contiguous view) then never copies the whole tensor.
        for block in tensor.reshape(-1).split(WRITE_BLOCK_ELEMENTS):
            self._handle.write(block.to(planned.dtype).contiguous().view(torch.uint8).numpy().data)
        self.bytes_written += planned.num_bytes
        self._position += 1

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> None:
        assert self._position == len(self._queue), "not every planned tensor was written"
        self._close()
        weight_map = {t.name: self.file_names[i] for i, shard in enumerate(self.shards) for t in shard}
        index = {"metadata": {"total_size": self.bytes_written}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# The source checkpoint: folder, config, metadata, tokenizer
# ---------------------------------------------------------------------------------------------


@dataclass
class Source:
    folder: Path
    iteration: int
    config: Any  # pretrain.config.TrainConfig
    meta: dict[str, Any]
    reader: TorchDistReader

    @cached_property
    def vocab_rows(self) -> int:
        """source_vocab_rows of this checkpoint, found once (it may read the checkpoints it started from)."""
        return checkpoint_format.source_vocab_rows(self.meta, self.config)


def open_checkpoint(root: Path, iteration: int | None = None) -> Source:
    """The checkpoint folder under `root` (or `root` itself if it is an iter_NNNNNNN folder)."""
    if not root.exists():
        raise UserError(
            f"checkpoint folder {str(root)!r} does not exist; pass the checkpoint folder (checkpoint.dir)"
        )
    if iteration is None and (root / checkpoint_format.META_FILE).is_file():
        folder = root
    else:
        folder = checkpoint_format.find_checkpoint(root, iteration)
    meta = checkpoint_format.read_meta(folder)
    config_path = folder / checkpoint_format.CONFIG_FILE
    if not config_path.is_file():
        raise UserError(
            f"{folder} has no {checkpoint_format.CONFIG_FILE}: the model cannot be described without it; "
            "use a checkpoint saved by `kumihimo train`"
        )
    try:
        config = from_saved(configtree.read_yaml(config_path))
        config.model.validate()
    except UserError as exc:
        raise UserError(f"{config_path} does not describe a model this version can read: {exc}") from exc
    for field in ("vocab_size", "padded_vocab_size"):
        if not isinstance(meta.get(field), int):
            raise UserError(
                f"{folder / checkpoint_format.META_FILE} lacks {field}; the checkpoint is incomplete"
            )
    state = meta.get("train_state") or {}
    return Source(folder, int(state.get("iteration", -1)), config, meta, TorchDistReader(folder))


@dataclass
class TokenizerInfo:
    path: Path | None
    identity: dict[str, Any] | None
    vocab_size: int
    kind: str = "sentencepiece"  # or "huggingface": a tokenizer.json folder, whose files are copied


def resolve_tokenizer(source: Source, override: str | Path | None) -> TokenizerInfo:
    """The tokenizer the checkpoint was trained with (a SentencePiece model or a Hugging Face tokenizer
    folder), checked by sha256 and size."""
    from kumihimo.tokenizer.base import load_tokenizer

    identity = source.meta.get("tokenizer")
    recorded = (identity or {}).get("path") or source.config.data.tokenizer
    vocab_size = source.meta["vocab_size"]
    if override is None and recorded is None:
        return TokenizerInfo(None, None, vocab_size)  # mock data: no tokenizer to export
    try:
        tokenizer = load_tokenizer(override if override is not None else recorded)
    except UserError as exc:
        raise UserError(
            f"the tokenizer the checkpoint was trained with ({recorded}) cannot be read ({exc}); "
            "pass --tokenizer PATH to the same SentencePiece model or Hugging Face tokenizer folder"
        ) from exc
    if identity and identity.get("sha256") and tokenizer.sha256 != identity["sha256"]:
        raise UserError(
            f"tokenizer mismatch: {tokenizer.path} has sha256 {tokenizer.sha256[:12]}... but the "
            f"checkpoint was trained with {identity['sha256'][:12]}... ({recorded}); pass the "
            "same tokenizer with --tokenizer"
        )
    if tokenizer.vocab_size != vocab_size:
        raise UserError(
            f"vocab mismatch: tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the "
            f"checkpoint's vocab_size is {vocab_size}; pass the tokenizer it was trained with"
        )
    kind = getattr(tokenizer, "kind", "sentencepiece")
    return TokenizerInfo(tokenizer.path, identity or tokenizer.identity(), vocab_size, kind)


def dims_for(source: Source, keep_vocab_padding: bool) -> LlamaDims:
    padded = source.meta["padded_vocab_size"]
    rows = padded if keep_vocab_padding else source.vocab_rows
    return LlamaDims.from_model(source.config.model, megatron_vocab_size=padded, hf_vocab_size=rows)


def check_architecture(reader: TorchDistReader, dims: LlamaDims) -> None:
    """Every model tensor must be in the table with the shape the config implies, and vice versa."""
    known = {}
    for rule in global_rules(dims):
        known[stored_key(rule, dims)] = rule
    for layer in range(dims.num_layers):  # stacked layers share a key: a rule is then recorded once
        for rule in layer_rules(dims, layer):
            known[stored_key(rule, dims, layer)] = rule
    extra = sorted(set(reader.tensors) - set(known))
    if extra:
        raise UserError(
            f"unsupported architecture: checkpoint tensor(s) {', '.join(extra[:3])} have no "
            "Hugging Face counterpart for this model config (extra layers, or a model section that does "
            "not describe the checkpoint: add_qkv_bias/qk_layernorm/tie_word_embeddings/moe)"
        )
    for key, rule in known.items():
        if key not in reader.tensors:
            raise UserError(
                f"checkpoint {reader.folder} lacks tensor {key}; it is incomplete or its "
                "run_config.yaml does not describe it (add_qkv_bias, qk_layernorm, tie_word_embeddings, moe)"
            )
        expected = stored_shape(rule, dims)
        if reader.shape(key) != expected:
            raise UserError(
                f"tensor {key} has shape {list(reader.shape(key))} but run_config.yaml and "
                f"kumihimo.json imply {list(expected)}; the files do not belong together"
            )


# ---------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------


def production_order(dims: LlamaDims) -> list[tuple[Rule, int | None, int | None]]:
    """(rule, layer, expert) in the order tensors are read and written: the embedding, layer by layer
    (expert by expert), the final norm, the head. One tensor (one layer's or one expert's slice) at a
    time keeps peak memory near the largest single tensor; chunks are per layer and TP rank, so no file
    region is read twice."""
    first, *last = global_rules(dims)
    return [
        (first, None, None),
        *(
            (rule, layer, expert)
            for layer in range(dims.num_layers)
            for rule in layer_rules(dims, layer)
            for expert in (range(dims.num_experts) if rule.per_expert else [None])
        ),
        *((rule, None, None) for rule in last),
    ]


def planned_tensors(dims: LlamaDims, dtype: torch.dtype) -> list[PlannedTensor]:
    return [
        PlannedTensor(name, shape, dtype)
        for rule, layer, expert in production_order(dims)
        for name, shape in zip(rule.hf_names(layer, expert), hf_shapes(rule, dims))
    ]


def write_weights(
    reader: TorchDistReader, dims: LlamaDims, folder: Path, dtype: torch.dtype, max_shard_bytes: int
) -> int:
    """Stream every tensor through its transform into safetensors shards; returns bytes written."""
    writer = StreamingSafetensorsWriter(folder, planned_tensors(dims, dtype), max_shard_bytes)
    last_of_layer = [layer_rules(dims, layer)[-1] for layer in range(dims.num_layers)]
    with Progress("convert", total=dims.num_layers, unit="layers") as progress:
        for rule, layer, expert in production_order(dims):
            key, index = stored_key(rule, dims, layer), stored_index(rule, dims, layer, expert)
            tensor = reader.read({key: (key, index)})[key]
            for name, part in zip(
                rule.hf_names(layer, expert), TRANSFORMS[rule.transform].to_hf(tensor, dims)
            ):
                writer.write(name, part)
            del tensor, part  # free before the next read allocates (peak = one tensor, not two)
            if layer is not None and rule is last_of_layer[layer] and expert in (None, dims.num_experts - 1):
                progress.update()
    writer.finish()
    return writer.bytes_written


ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
# The mixture-of-experts family of each dense family (attention and norms as the dense one).
MOE_FAMILIES = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}


def export_family(model) -> str:
    """The Hugging Face family of a model config, refusing feature mixes no family has."""
    if model.add_qkv_bias and model.qk_layernorm:
        raise UserError(
            "the model has both QKV biases (model.add_qkv_bias) and q/k norms (model.qk_layernorm); no "
            f"supported Hugging Face family ({', '.join(ARCHITECTURES.values())}) has both, so it cannot be "
            "exported"
        )
    moe = getattr(model, "moe", None)
    if moe is None or moe.num_experts == 0:
        return model.hf_family
    family = MOE_FAMILIES[model.hf_family]
    shared = moe.shared_expert_ffn_hidden_size > 0
    if family == "qwen2_moe" and not (shared and moe.shared_expert_gate):
        raise UserError(
            "Qwen2-MoE (a model with QKV biases and experts) always has a gated shared expert; set "
            "model.moe.shared_expert_ffn_hidden_size and model.moe.shared_expert_gate=true, or export "
            "without QKV biases (Qwen3-MoE, Mixtral)"
        )
    if family != "qwen2_moe" and shared:
        raise UserError(
            f"{ARCHITECTURES[family]} has no shared expert but model.moe.shared_expert_ffn_hidden_size="
            f"{moe.shared_expert_ffn_hidden_size}; only Qwen2-MoE (model.add_qkv_bias=true) has one"
        )
    if family == "mixtral" and moe.dense_first_layers:
        raise UserError(
            f"model.moe.dense_first_layers={moe.dense_first_layers}: Mixtral has no dense layers, and a model "
            "without q/k norms or QKV biases exports as MixtralForCausalLM; only Qwen3-MoE (model.qk_layernorm) "
            "and Qwen2-MoE (model.add_qkv_bias) carry dense first layers, so this model cannot be exported"
        )
    if family == "mixtral" and moe.router_pre_softmax:
        raise UserError(
            "Mixtral routes by top-k then softmax over the k, but model.moe.router_pre_softmax=true; "
            "such a model cannot be exported as MixtralForCausalLM"
        )
    if moe.capacity_factor is not None:
        log.info(
            f"warning: model.moe.capacity_factor={moe.capacity_factor} drops tokens in training; "
            f"{ARCHITECTURES[family]} is dropless, so its outputs differ where tokens were dropped"
        )
    return family


def moe_fields(model, family: str) -> dict[str, Any]:
    """config.json's mixture-of-experts keys for `family` (transformers 4.57 and 5 read these names)."""
    moe = model.moe
    expert_width = moe.ffn_hidden_size or model.ffn_hidden_size
    fields: dict[str, Any] = {
        "num_experts_per_tok": moe.router_topk,
        "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False,
    }
    if family == "mixtral":
        # Mixtral's intermediate_size is the experts' width.
        return {**fields, "num_local_experts": moe.num_experts, "intermediate_size": expert_width}
    fields.update(
        num_experts=moe.num_experts,
        moe_intermediate_size=expert_width,
        norm_topk_prob=not moe.router_pre_softmax,
        # intermediate_size (hf_config) is the width of these dense layers' MLP
        decoder_sparse_step=1,
        mlp_only_layers=list(range(moe.dense_first_layers)),
    )
    if family == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = moe.shared_expert_ffn_hidden_size
    return fields


def rope_fields(model) -> dict[str, Any]:
    """config.json's RoPE keys: rope_parameters (transformers 5) and rope_theta + rope_scaling (4.x,
    vLLM), from model.rotary_base and model.rope_scaling."""
    theta = float(model.rotary_base)
    scaling = model.rope_scaling
    if scaling.type == "none":
        return {
            "rope_theta": theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        }
    params: dict[str, Any] = {"rope_type": scaling.type, "factor": scaling.factor}
    if scaling.type == "llama3":
        params.update(
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position_embeddings,
        )
    elif scaling.type == "yarn":
        params.update(
            original_max_position_embeddings=scaling.original_max_position_embeddings,
            beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow,
        )
        if not scaling.truncate:  # transformers' default is True
            params["truncate"] = False
        for key in ("mscale", "mscale_all_dim", "attention_factor"):
            if getattr(scaling, key) is not None:
                params[key] = getattr(scaling, key)
    return {
        "rope_theta": theta,
        "rope_scaling": dict(params),
        "rope_parameters": {**params, "rope_theta": theta},
    }


def hf_config(
    source: Source, dims: LlamaDims, tokenizer: TokenizerInfo, dtype: torch.dtype
) -> dict[str, Any]:
    model = source.config.model
    family = export_family(model)
    identity = tokenizer.identity or {}
    dtype_name = HF_DTYPE_NAMES[dtype]
    config = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.ffn_hidden_size,
        "num_hidden_layers": dims.num_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_query_groups,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.context_length,
        "rms_norm_eps": model.norm_epsilon,
        # Both spellings: transformers < 5 and most serving stacks read rope_theta/rope_scaling,
        # transformers 5 rope_parameters.
        **rope_fields(model),
        "attention_dropout": 0.0,
        "initializer_range": model.init_method_std,
        "vocab_size": dims.hf_vocab_size,
        "bos_token_id": identity.get("bos_id"),
        "eos_token_id": identity.get("eos_id"),
        "pad_token_id": identity.get("pad_id"),
        "tie_word_embeddings": dims.tied_embeddings,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }
    if family in ("llama", "qwen3", "qwen3_moe"):  # Qwen2's q/k/v biases are implied by its architecture
        config["attention_bias"] = False
    if family == "llama":
        config["mlp_bias"] = False
    if family != "llama":  # full attention in every layer
        config["sliding_window"] = None
    if family.startswith("qwen"):
        config.update(use_sliding_window=False, max_window_layers=dims.num_layers)
    if family in MOE_FAMILIES.values():
        config.update(moe_fields(model, family))
    config["kumihimo"] = provenance(source, dims, tokenizer)
    return config


def provenance(source: Source, dims: LlamaDims, tokenizer: TokenizerInfo) -> dict[str, Any]:
    """Where the weights came from, and why the vocabulary has the size it has."""
    info: dict[str, Any] = {
        "source_checkpoint": str(source.folder.resolve()),
        "iteration": source.iteration,
        "consumed_tokens": (source.meta.get("train_state") or {}).get("consumed_tokens"),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "megatron_padded_vocab_size": dims.megatron_vocab_size,
        "tokenizer_sha256": (tokenizer.identity or {}).get("sha256"),
    }
    source_rows = source.vocab_rows
    if dims.hf_vocab_size == source_rows != tokenizer.vocab_size:
        info["vocab_rows_of_source_model"] = (
            f"rows {tokenizer.vocab_size}..{source_rows - 1} of embed_tokens and lm_head have no piece in the "
            "tokenizer; they are kept because the Hugging Face model this checkpoint was imported from had "
            f"vocab_size {source_rows}."
        )
    elif dims.hf_vocab_size != tokenizer.vocab_size:
        info["vocab_padding_kept"] = (
            f"rows {tokenizer.vocab_size}..{dims.hf_vocab_size - 1} of embed_tokens and lm_head are Megatron's "
            "tensor-parallel padding (never trained on; no token maps to them). Kept on request "
            "(--keep-vocab-padding), e.g. for kernels that want a vocabulary multiple of 128."
        )
    return info


def generation_config(tokenizer: TokenizerInfo) -> dict[str, Any]:
    identity = tokenizer.identity or {}
    config = {"_from_model_config": True}
    for name, key in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"), ("pad_token_id", "pad_id")):
        if identity.get(key) is not None:
            config[name] = identity[key]
    return config


def write_tokenizer(tokenizer: TokenizerInfo, folder: Path) -> str:
    """The tokenizer files of the exported folder: a Hugging Face tokenizer's own files, copied (and
    loaded back to check the copy has the recorded identity); for SentencePiece, the Hugging Face files
    made by the exporter when it is available, else tokenizer.model alone."""
    from kumihimo.tokenizer.hf import HFTokenizer
    from kumihimo.tokenizer.spm import MODEL_FILENAME

    if tokenizer.path is None:
        log.info(
            "warning: the checkpoint was trained on mock data without a tokenizer; no tokenizer "
            "files are written and config.json has no bos/eos ids"
        )
        return "none (mock data)"
    if tokenizer.kind == HFTokenizer.kind:
        copied = copy_hf_tokenizer(tokenizer.path, folder)
        exported = HFTokenizer(folder)
        expected = (tokenizer.identity or {}).get("sha256")
        if expected and exported.sha256 != expected:  # a file changed while it was being copied
            raise UserError(
                f"the tokenizer copied from {tokenizer.path} has sha256 {exported.sha256[:12]}, not the "
                f"recorded {expected[:12]}; check that nothing is rewriting it and convert again"
            )
        return ", ".join(copied) + " (copied)"
    try:
        from kumihimo.tokenizer.export_hf import write_hf_tokenizer_files
    except ImportError as exc:
        shutil.copyfile(tokenizer.path, folder / MODEL_FILENAME)
        log.info(
            f"warning: tokenizer.export_hf is unavailable ({exc}); copied {MODEL_FILENAME} only, "
            "so AutoTokenizer cannot load this folder until the HF tokenizer files are exported"
        )
        return f"{MODEL_FILENAME} only"
    write_hf_tokenizer_files(tokenizer.path, folder)
    return "tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model"


def write_readme(folder: Path, config: dict[str, Any], tokenizer_files: str) -> None:
    origin = config["kumihimo"]
    lines = [
        "# Converted by kumihimo",
        "",
        f"{config['architectures'][0]} from the Megatron-Core checkpoint `{origin['source_checkpoint']}` "
        f"(iteration {origin['iteration']}), converted by `kumihimo convert to-hf`.",
        "",
        f"- weights: {config['torch_dtype']}, vocab_size {config['vocab_size']} "
        f"(tokenizer: {origin['tokenizer_vocab_size']}, Megatron padded: {origin['megatron_padded_vocab_size']})",
        f"- tokenizer files: {tokenizer_files}",
    ]
    if "vocab_padding_kept" in origin:
        lines.append(f"- vocabulary padding kept: {origin['vocab_padding_kept']}")
    if "vocab_rows_of_source_model" in origin:
        lines.append(f"- vocabulary rows of the source model: {origin['vocab_rows_of_source_model']}")
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def convert_to_hf(
    checkpoint_root: str | Path,
    output_dir: str | Path,
    iteration: int | None = None,
    dtype: str | None = "bf16",
    keep_vocab_padding: bool = False,
    tokenizer: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a Hugging Face folder (Llama, Mistral, Qwen2 or Qwen3) for a kumihimo checkpoint; returns it.

    `checkpoint_root` is a checkpoint folder, checkpoint.dir (latest iteration unless `iteration` is given), or
    one iter_NNNNNNN folder. `tokenizer` replaces the recorded tokenizer path (the file must be the
    same model: its sha256 is checked) when the checkpoint was moved to another machine.
    `dtype` None exports in the checkpoint's own precision (precision.params_dtype).
    """
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    output_dir = Path(output_dir)
    source = open_checkpoint(Path(checkpoint_root), iteration)
    dtype = dtype or source.config.precision.params_dtype
    tokenizer_info = resolve_tokenizer(source, tokenizer)
    dims = dims_for(source, keep_vocab_padding)
    export_family(source.config.model)
    check_architecture(source.reader, dims)
    started = time.monotonic()
    with staged_output(output_dir, "convert to-hf") as staging:
        num_bytes = write_weights(source.reader, dims, staging, DTYPES[dtype], max_shard_bytes)
        config = hf_config(source, dims, tokenizer_info, DTYPES[dtype])
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(
            json.dumps(generation_config(tokenizer_info), indent=2) + "\n"
        )
        write_readme(staging, config, write_tokenizer(tokenizer_info, staging))
    elapsed = time.monotonic() - started
    log.info(
        f"wrote {output_dir} ({num_bytes / 1e9:.2f} GB of weights in {elapsed:.1f} s, "
        f"{num_bytes / 1e9 / max(elapsed, 1e-9):.2f} GB/s) from {source.folder}"
    )
    return output_dir

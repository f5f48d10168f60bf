"""Hugging Face Llama-architecture model -> kumihimo checkpoint for continual pretraining.

The output is a checkpoint folder like the trainer's (`<output>/iter_0000000/` + the latest marker)
holding model weights only (no optimizer, scheduler or RNG state; kumihimo.json says
`"weights_only": true`), a run_config.yaml whose model section is derived from config.json and whose
parallelism is the target TP/PP, and the tokenizer when the Hugging Face folder has a SentencePiece
`tokenizer.model`. The vocabulary is padded for the target TP as the trainer pads it.

Tensors are written through the GPTModel the trainer builds (at TP=1/PP=1, on CPU), via its own
sharded state dict: the checkpoint therefore has exactly the keys (including per-layer
`_extra_state` objects) the trainer loads, and loads at any TP/PP. This keeps one copy of the model
in memory; it is meant for models that fit in host RAM. While it runs it owns torch.distributed (a
one-process gloo group) and redirects CUDA calls to the CPU, so call it where no process group exists
(the CLI runs it in its own process); both are torn down when it returns.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kumihimo import configtree
from kumihimo.errors import UserError
from kumihimo.progress import say
from pretrain import checkpointing
from pretrain.convert.mapping import LAYER_PREFIX, RULES, TRANSFORMS, LlamaDims, Rule

HF_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
SUPPORTED_MODEL_TYPES = ("llama",)
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


def read_hf_model(folder: Path) -> HFModel:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json; pass a Hugging Face model folder")
    config = json.loads(config_path.read_text())
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: folder / file for name, file in weight_map.items()}
    elif (folder / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(folder / "model.safetensors", "pt") as handle:
            files = {name: folder / "model.safetensors" for name in handle.keys()}  # noqa: SIM118
    else:
        raise UserError(f"{folder} has no safetensors weights (model.safetensors or its index); convert "
                        "pytorch_model.bin to safetensors first")
    missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
    if missing:
        raise UserError(f"{folder} lacks weight file(s) {', '.join(missing)} named in its index; download them")
    return HFModel(folder, config, files)


def check_supported(config: dict[str, Any]) -> None:
    """Refuse what the Megatron side cannot represent, naming the config.json key."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"config.json model_type={model_type!r} is not supported; only Llama-architecture "
                        "models (model_type 'llama') can be converted")
    problems = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
    }
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    problems["rope_scaling"] = rope.get("rope_type", rope.get("type", "default")) != "default"
    for key, bad in problems.items():
        if bad:
            raise UserError(f"config.json {key} is not supported by the kumihimo model (SwiGLU, no biases, "
                            "plain RoPE); this model cannot be converted")


def rope_theta(config: dict[str, Any]) -> int:
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise UserError(f"config.json rope_theta={theta} is not an integer, which model.rotary_base needs")
    return int(theta)


def train_config(hf: HFModel, tp: int, pp: int, tokenizer_path: Path | None):
    """The TrainConfig whose model is the Hugging Face model, laid out for TP x PP."""
    from pretrain.config import TrainConfig

    c = hf.config
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    model = {
        "num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"], "num_attention_heads": heads,
        "num_query_groups": c.get("num_key_value_heads") or heads,
        "kv_channels": None if head_dim * heads == c["hidden_size"] else head_dim,
        "seq_length": c.get("max_position_embeddings", 4096), "rotary_base": rope_theta(c),
        "norm_epsilon": c.get("rms_norm_eps", 1e-5), "init_method_std": c.get("initializer_range", 0.02),
    }
    data = {
        "name": hf.folder.name,
        "model": model,
        "parallelism": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        # bf16 training for 16-bit models; fp32 checkpoints (tests, tiny models) stay fp32.
        "precision": {"params_dtype": "fp32" if hf.dtype == torch.float32 else "bf16"},
        "data": {"tokenizer": str(tokenizer_path) if tokenizer_path else None},
    }
    config = configtree.from_dict(TrainConfig, data)
    config.model.validate()
    from pretrain.parallel import check_model_fits_layout

    check_model_fits_layout(config)
    return config


def resolve_tokenizer(hf: HFModel, output_root: Path, staging_root: Path):
    """Copy the SentencePiece model (if any) beside the checkpoint; returns (Tokenizer | None, final path)."""
    from tokenizer.spm import MODEL_FILENAME, Tokenizer

    source = hf.folder / MODEL_FILENAME
    if not source.is_file():
        say(f"[convert] warning: {hf.folder} has no SentencePiece {MODEL_FILENAME}; run_config.yaml gets "
            "data.tokenizer=null: set it to the model's SentencePiece tokenizer before training")
        return None, None
    (staging_root / TOKENIZER_DIR).mkdir()
    shutil.copyfile(source, staging_root / TOKENIZER_DIR / MODEL_FILENAME)
    final = (output_root / TOKENIZER_DIR / MODEL_FILENAME).resolve()
    return Tokenizer.load(staging_root / TOKENIZER_DIR / MODEL_FILENAME), final


def vocab_sizes(hf: HFModel, tokenizer, tp: int, divisible_by: int) -> tuple[int, int]:
    """(vocab size, padded size) as the trainer will compute them from the tokenizer."""
    hf_vocab = hf.config["vocab_size"]
    vocab = tokenizer.vocab_size if tokenizer is not None else hf_vocab
    multiple = divisible_by * tp
    padded = -(-vocab // multiple) * multiple
    if vocab > hf_vocab:
        raise UserError(f"tokenizer.model has {vocab} pieces but config.json vocab_size is {hf_vocab}; the "
                        "folder's tokenizer does not belong to the model")
    if hf_vocab > padded:
        raise UserError(f"config.json vocab_size={hf_vocab} exceeds the tokenizer's {vocab} pieces padded for "
                        f"TP={tp} ({padded}); the extra rows cannot be kept")
    return vocab, padded


class HFTensors:
    """Tensors of a Hugging Face model, read one at a time from its safetensors files."""

    # Buffers some exporters save; they are recomputed, not weights.
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, hf: HFModel):
        self.hf = hf
        self.used: set[str] = set()
        self._handles: dict[Path, Any] = {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.hf.weight_files and self.hf.config.get("tie_word_embeddings"):
            say("[convert] note: tied embeddings are untied (lm_head starts as a copy of embed_tokens), as the "
                "kumihimo model has a separate output layer")
            name = "model.embed_tokens.weight"
        if name not in self.hf.weight_files:
            raise UserError(f"{self.hf.folder} lacks tensor {name}; it is not a complete Llama model")
        from safetensors import safe_open

        path = self.hf.weight_files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(path, "pt")
        tensor = self._handles[path].get_tensor(name)
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"{name} has shape {list(tensor.shape)} but config.json implies {list(shape)}")
        self.used.add(name)
        return tensor

    def check_all_used(self) -> None:
        unused = sorted(n for n in self.hf.weight_files if n not in self.used and not n.endswith(self.IGNORED_SUFFIXES))
        if unused:
            raise UserError(f"unsupported architecture: {', '.join(unused[:3])} have no place in the kumihimo "
                            "model (biases, MoE or extra modules cannot be converted)")


@torch.no_grad()
def fill_model(model, tensors: HFTensors, dims: LlamaDims) -> None:
    """Copy the Hugging Face weights into the GPTModel, through its own sharded state dict (the keys,
    stacked layer offsets and SwiGLU gate/up halves the trainer saves and loads)."""
    from pretrain.checkpointing import SHARDING_METADATA
    from pretrain.convert.mapping import hf_shapes
    from pretrain.model import sharded_tensors

    rules: dict[str, Rule] = {rule.megatron: rule for rule in RULES}
    cached: dict[tuple[str, int | None], torch.Tensor] = {}
    for st in sharded_tensors(model.sharded_state_dict(metadata=SHARDING_METADATA)):
        rule = rules.get(st.key)
        assert rule is not None, f"GPTModel tensor {st.key} is missing from pretrain.convert.mapping.RULES"
        layer = st.global_offset[0] if st.prepend_axis_num else None
        assert (layer is not None) == st.key.startswith(LAYER_PREFIX), st.key
        if (st.key, layer) not in cached:
            cached.clear()  # shards of one tensor come together (gate/up halves): keep only the current one
            parts = [tensors.get(name, shape) for name, shape in zip(rule.hf_names(layer), hf_shapes(rule, dims))]
            cached[(st.key, layer)] = TRANSFORMS[rule.transform].from_hf(parts, dims)
        full = cached[(st.key, layer)]
        offsets = st.global_offset[st.prepend_axis_num:]
        st.data.copy_(full[tuple(slice(o, o + n) for o, n in zip(offsets, st.data.shape))])
    tensors.check_all_used()


class _OneProcessMegatron:
    """A world-size-1 gloo group and TP=PP=1 model-parallel state, torn down on exit."""

    def __enter__(self) -> _OneProcessMegatron:
        import torch.distributed as dist

        from pretrain import cpu_compat

        if dist.is_initialized():
            raise UserError("convert from-hf starts its own one-process group; run it in a separate process "
                            "(the `kumihimo convert from-hf` CLI does)")
        cpu_compat.activate()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        return self

    def __exit__(self, *exc) -> None:
        from pretrain import cpu_compat
        from pretrain.distributed import destroy

        destroy()
        cpu_compat.deactivate()


def _build_model(config, padded_vocab: int, dtype: torch.dtype):
    """The trainer's GPTModel at TP=1/PP=1 on CPU, holding `dtype` weights."""
    import copy

    from pretrain.model import build_model
    from pretrain.parallel import ParallelLayout

    local = copy.deepcopy(config)
    local.parallelism = type(config.parallelism)()
    local.runtime.device = "cpu"
    local.model.transformer_impl = "local"
    local.precision.params_dtype = "bf16" if dtype == torch.bfloat16 else "fp32"
    (model,) = build_model(local, ParallelLayout.from_config(local, 1), padded_vocab)
    return model


def _meta(hf: HFModel, vocab: int, padded: int, tokenizer, tokenizer_path: Path | None) -> dict[str, Any]:
    import megatron.core

    from kumihimo import __version__

    identity = None
    if tokenizer is not None:
        identity = {**tokenizer.identity(), "path": str(tokenizer_path)}
    return {
        "format": "kumihimo-torch_dist-v1",
        "weights_only": True,
        "vocab_size": vocab,
        "padded_vocab_size": padded,
        "tokenizer": identity,
        "data": None,
        "source": {"hf_model": str(hf.folder.resolve()), "hf_vocab_size": hf.config["vocab_size"],
                   "hf_dtype": str(hf.dtype).removeprefix("torch.")},
        "versions": {"kumihimo": __version__, "megatron.core": megatron.core.__version__,
                     "torch": torch.__version__},
        "train_state": checkpointing.TrainState().__dict__,
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "cp": 1, "dp": 1, "vpp": None},
    }


def convert_from_hf(model_dir: str | Path, output_dir: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Write a weights-only kumihimo checkpoint root for a Hugging Face Llama model; returns it.

    The run_config.yaml inside is laid out for TP x PP (the vocabulary padded for TP); the tensors
    themselves load at any layout. Run in its own process (see the module docstring).
    """
    hf = read_hf_model(Path(model_dir))
    check_supported(hf.config)
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"output {str(output_dir)!r} already exists and is not an empty folder; choose a new "
                        "folder or delete it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        tokenizer, tokenizer_path = resolve_tokenizer(hf, output_dir, staging)
        config = train_config(hf, tp, pp, tokenizer_path)
        vocab, padded = vocab_sizes(hf, tokenizer, tp, config.model.make_vocab_size_divisible_by)
        dims = LlamaDims(num_layers=config.model.num_layers, hidden_size=config.model.hidden_size,
                         ffn_hidden_size=config.model.ffn_hidden_size,
                         num_attention_heads=config.model.num_attention_heads,
                         num_query_groups=config.model.query_groups, head_dim=config.model.head_dim,
                         megatron_vocab_size=padded, hf_vocab_size=hf.config["vocab_size"])
        # fp16 is stored as fp32 (exact); bf16 and fp32 as they are, so a round trip is bit-identical.
        dtype = torch.bfloat16 if hf.dtype == torch.bfloat16 else torch.float32
        folder = checkpointing.iteration_dir(staging, 0)
        folder.mkdir()
        with _OneProcessMegatron():
            from megatron.core import dist_checkpointing

            model = _build_model(config, padded, dtype)
            fill_model(model, HFTensors(hf), dims)
            sharded = {"model": model.sharded_state_dict(metadata=checkpointing.SHARDING_METADATA)}
            dist_checkpointing.save(sharded, str(folder), content_metadata=checkpointing.SHARDING_METADATA)
        configtree.save(config, folder / checkpointing.CONFIG_FILE)
        meta = _meta(hf, vocab, padded, tokenizer, tokenizer_path)
        (folder / checkpointing.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / checkpointing.LATEST_FILE).write_text("0\n")
        staging.chmod(0o755)  # mkdtemp makes it private
        if output_dir.exists():
            output_dir.rmdir()
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"[convert] wrote weights-only checkpoint {output_dir} (vocab {vocab} padded to {padded} for TP={tp}); "
        f"continue pretraining from it with its {checkpointing.CONFIG_FILE} plus your data.* settings")
    return output_dir

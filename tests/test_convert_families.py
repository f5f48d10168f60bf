"""Hugging Face families beyond plain Llama: Llama 3.x RoPE scaling (llama3, YaRN), Mistral (with linear
RoPE scaling), Qwen2 (QKV biases, tied embeddings) and Qwen3 (q/k norms, head_dim != hidden / heads).

Fast tests: the trainer's RoPE frequencies equal transformers' rope init functions for every scaling
type, config.json is read into the model config (families, RoPE, refusals), the QKV bias transform.

Slow tests: tiny random models of each family (every weight random, norms around 1, biases nonzero)
are converted `from-hf`; one torchrun job (2 gloo processes) builds the Megatron model from each
checkpoint at TP=1, TP=2 and PP=2 and its fp32 logits must equal transformers' within 1e-4. The
round trip from-hf -> to-hf is bit-identical, and the exported folder loads offline with
AutoModelForCausalLM as the right class, giving the original's logits. The trainer continues
pretraining the Qwen2 checkpoint at TP=2 (test_convert_from_hf's helper), and the streaming writer's
plan for Qwen2/Qwen3 equals what dist_checkpointing.save writes for the trainer's model.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kumihimo.core import configtree
from kumihimo.core.configtree import ConfigError
from kumihimo.core.errors import UserError
from kumihimo.pretrain.config import ModelConfig, TrainConfig
from kumihimo.pretrain.convert import from_hf
from kumihimo.pretrain.convert.mapping import TRANSFORMS, LlamaDims, layer_rules
from kumihimo.pretrain.rope import attention_factor, rope_inv_freq
from tests.test_convert_from_hf import hf_weights

VOCAB = 1000
BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # below the prompt length, so the scaling matters
}
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}
LINEAR = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
# name -> (transformers config class, class of the model, config changes)
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(head_dim=16, rope_parameters=LLAMA3)),
    "yarn-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(head_dim=16, rope_parameters=YARN, tie_word_embeddings=True),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(head_dim=16, sliding_window=None, rope_parameters=LINEAR),
    ),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True),
    ),
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    ),
}
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def model_config(hf_config: dict) -> ModelConfig:
    """The model section `convert from-hf` derives from a config.json dict."""
    from_hf.check_supported(hf_config)
    hf = from_hf.HFModel(Path("unused"), hf_config, {})
    return from_hf.train_config(hf, 1, 1, None).model


# ------------------------------------------------------------------------------------------ fast


@pytest.mark.parametrize(
    "rope",
    [
        LLAMA3,
        dict(LLAMA3, factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0, rope_theta=500000.0),
        LINEAR,
        YARN,
        dict(YARN, factor=8.0, beta_fast=16.0, beta_slow=2.0, truncate=False),
        dict(YARN, mscale=1.0, mscale_all_dim=0.5),
        dict(YARN, attention_factor=1.3),
    ],
    ids=[
        "llama3",
        "llama3-3.1",
        "linear",
        "yarn",
        "yarn-untruncated",
        "yarn-mscale",
        "yarn-attention-factor",
    ],
)
def test_rope_frequencies_equal_transformers(rope):
    """config.json -> model.rope_scaling -> the trainer's inverse frequencies and attention factor, against
    transformers' own functions for the same config.json."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(**{**BASE, "head_dim": 32, "rope_parameters": dict(rope)})
    expected, expected_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    model = model_config(hf.to_dict())
    assert model.rope_scaling.type == rope["rope_type"]
    ours = rope_inv_freq(model)
    assert ours.shape == expected.shape
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert attention_factor(model) == pytest.approx(expected_factor, rel=1e-12)
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 32, 2).float() / 32))
    assert not torch.allclose(ours, plain)  # the case does exercise the scaling


def test_families_are_read_from_config_json():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    qwen2 = model_config(Qwen2Config(**BASE, tie_word_embeddings=True).to_dict())
    assert (qwen2.family, qwen2.add_qkv_bias, qwen2.qk_layernorm, qwen2.tie_word_embeddings) == (
        "qwen2",
        True,
        False,
        True,
    )
    qwen3 = model_config(Qwen3Config(**BASE, head_dim=32).to_dict())
    assert (qwen3.family, qwen3.add_qkv_bias, qwen3.qk_layernorm, qwen3.kv_channels) == (
        "qwen3",
        False,
        True,
        32,
    )
    mistral = model_config(MistralConfig(**BASE, sliding_window=None).to_dict())
    assert mistral.family == "mistral" and mistral.hf_family == "mistral" and not mistral.add_qkv_bias
    llama = model_config(LlamaConfig(**BASE, rope_parameters=dict(LLAMA3)).to_dict())
    assert llama.hf_family == "llama" and llama.rope_scaling.original_max_position_embeddings == 32
    # transformers 4.x spelling: rope_theta at the top, rope_scaling with "type"
    legacy = {
        **LlamaConfig(**BASE).to_dict(),
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    legacy.pop("rope_parameters")
    old = model_config(legacy)
    assert (old.rotary_base, old.rope_scaling.type, old.rope_scaling.factor) == (500000, "linear", 4.0)


def test_unsupported_families_and_features_are_refused():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    llama = LlamaConfig(**BASE).to_dict()
    cases = [
        (
            {**llama, "model_type": "gemma"},
            "model_type='gemma' is not supported; supported families: LlamaForCausalLM",
        ),
        ({**llama, "architectures": ["LlamaForSequenceClassification"]}, "only the causal-LM heads"),
        ({**llama, "attention_bias": True}, "attention_bias adds biases to o_proj"),
        ({**llama, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "type 'longrope'"),
        (
            {**llama, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "'dynamic'",
        ),
        (MistralConfig(**BASE, sliding_window=64).to_dict(), "sliding_window is 64, below"),
        (Qwen2Config(**BASE, use_sliding_window=True).to_dict(), "use_sliding_window"),
        (Qwen3Config(**BASE, attention_bias=True).to_dict(), "attention_bias"),
    ]
    for config, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
            from_hf.check_supported(config)
    # a window as long as the context is full attention
    assert from_hf.check_supported(MistralConfig(**BASE, sliding_window=128).to_dict()) == "mistral"


def test_model_config_validation_names_the_key():
    cases = [
        (
            {"rope_scaling": {"type": "llama3", "factor": 8.0}},
            "model.rope_scaling.original_max_position_embeddings",
        ),
        ({"rope_scaling": {"type": "linear", "factor": 0.5}}, "model.rope_scaling.factor=0.5"),
        (
            {
                "rope_scaling": {
                    "type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 32,
                    "beta_slow": 64.0,
                }
            },
            "beta_slow",
        ),
        ({"family": "qwen2"}, "model.family='qwen2' needs add_qkv_bias=true"),
        ({"add_qkv_bias": True, "family": "qwen3"}, "model.family='qwen3'"),
    ]
    for model, message in cases:
        config = configtree.from_dict(TrainConfig, {"model": model})
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            config.model.validate()
    with pytest.raises(ConfigError, match="rope_scaling.kind"):
        configtree.from_dict(TrainConfig, {"model": {"rope_scaling": {"kind": "yarn"}}})


def test_declared_context_is_kept_apart_from_the_training_sequence():
    """Llama 3.1 declares 131072 positions: the import trains at 8192 and exports 131072 again; a YaRN
    config without a factor gets transformers' (max_position_embeddings / original), others are refused."""
    from kumihimo.pretrain.convert.to_hf import Source, TokenizerInfo, hf_config, rope_fields

    long = model_config({**BASE, "model_type": "llama", "max_position_embeddings": 131072})
    assert (long.seq_length, long.max_position_embeddings) == (from_hf.IMPORT_SEQ_LENGTH, 131072)
    short = model_config({**BASE, "model_type": "llama"})
    assert (short.seq_length, short.max_position_embeddings) == (128, 128)
    meta = {"vocab_size": VOCAB, "padded_vocab_size": VOCAB}
    source = Source(folder=Path("ckpt"), iteration=0, config=TrainConfig(model=long), meta=meta, reader=None)
    dims = LlamaDims.from_model(long, megatron_vocab_size=VOCAB, hf_vocab_size=VOCAB)
    tokenizer = TokenizerInfo(path=None, identity=None, vocab_size=VOCAB)
    assert hf_config(source, dims, tokenizer, torch.float32)["max_position_embeddings"] == 131072
    with pytest.raises(ConfigError, match=r"model.max_position_embeddings.*at least 256"):
        ModelConfig(seq_length=256, max_position_embeddings=128).validate()

    no_factor = {k: v for k, v in YARN.items() if k != "factor"}
    yarn = model_config({**BASE, "model_type": "llama", "rope_parameters": no_factor})
    assert yarn.rope_scaling.factor == 128 / 32
    assert rope_fields(yarn)["rope_parameters"]["factor"] == 4.0
    with pytest.raises(UserError, match="have no factor.*add the factor"):
        model_config(
            {**BASE, "model_type": "llama", "rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}
        )


def test_exported_rope_fields_read_back_and_feature_mixes_are_refused():
    """to-hf's RoPE keys read back by from-hf give the same model.rope_scaling, for every type."""
    from kumihimo.pretrain.config import RopeScalingConfig
    from kumihimo.pretrain.convert.to_hf import export_family, rope_fields

    for rope in (LLAMA3, LINEAR, YARN, dict(YARN, truncate=False, mscale=1.0, mscale_all_dim=0.5)):
        model = model_config({**BASE, "model_type": "llama", "rope_parameters": dict(rope)})
        fields = rope_fields(model)
        for spelling in ("rope_parameters", "rope_scaling"):  # transformers 5 and 4.x / vLLM
            config = {
                **BASE,
                "model_type": "llama",
                "rope_theta": fields["rope_theta"],
                spelling: fields[spelling],
            }
            again = model_config(config)
            assert again.rope_scaling == model.rope_scaling and again.rotary_base == model.rotary_base, (
                spelling
            )
    plain = model_config({**BASE, "model_type": "llama"})
    assert plain.rope_scaling == RopeScalingConfig() and rope_fields(plain)["rope_scaling"] is None
    with pytest.raises(UserError, match="both QKV biases"):
        export_family(ModelConfig(add_qkv_bias=True, qk_layernorm=True))
    assert export_family(ModelConfig(qk_layernorm=True)) == "qwen3"


def test_qkv_bias_follows_the_weight_rows():
    """The bias is regrouped exactly like the weight's rows (the i-th bias belongs to the i-th row)."""
    dims = LlamaDims(
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=8,
        num_attention_heads=6,
        num_query_groups=2,
        head_dim=4,
        megatron_vocab_size=16,
        hf_vocab_size=16,
        qkv_bias=True,
    )
    qkv = TRANSFORMS["qkv_per_group"]
    rows = (6 + 2 * 2) * 4
    weight = torch.arange(rows * 8, dtype=torch.float32).view(rows, 8)
    bias = weight[:, 0].clone()
    for weight_part, bias_part in zip(qkv.to_hf(weight, dims), qkv.to_hf(bias, dims)):
        assert torch.equal(weight_part[:, 0], bias_part)
    assert torch.equal(qkv.from_hf(qkv.to_hf(bias, dims), dims), bias)
    names = [
        rule.megatron.split(".")[-2] + "." + rule.megatron.split(".")[-1] for rule in layer_rules(dims, 0)
    ]
    assert "linear_qkv.bias" in names and "q_layernorm.weight" not in names


# ------------------------------------------------------------------------------------------ slow


def make_hf_model(folder: Path, name: str, spm_model: Path) -> Path:
    import transformers

    config_class, _model_class, changes = FAMILIES[name]
    config = getattr(transformers, config_class)(**{**BASE, **changes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():  # norms and biases too, so a swap cannot hide
            is_norm = param.dim() == 1 and "norm" in param_name
            param.normal_(1.0 if is_norm else 0.0, 0.1 if param.dim() == 1 else 0.05)
    model.save_pretrained(folder)
    shutil.copyfile(spm_model, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def hf_models(work) -> dict[str, Path]:
    from tests.test_convert_to_hf import train_spm

    spm_model = train_spm(work / "tok", seed=2)
    return {name: make_hf_model(work / f"hf-{name}", name, spm_model) for name in FAMILIES}


@pytest.fixture(scope="module")
def converted(hf_models, work) -> dict[str, Path]:
    """Checkpoint roots of every family (TP=1 layout), plus Qwen2 laid out for TP=2 for the trainer."""
    roots = {
        name: from_hf.convert_from_hf(folder, work / f"ckpt-{name}") for name, folder in hf_models.items()
    }
    roots["qwen2-tp2"] = from_hf.convert_from_hf(hf_models["qwen2"], work / "ckpt-qwen2-tp2", tp=2)
    return roots


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def megatron(converted, prompt, work):
    """Run at once: the Megatron logits of every family at every layout (one torchrun job), the trainer
    on Qwen2 at TP=2, and dist_checkpointing.save of the trainer's Qwen2/Qwen3 models."""
    from tests.test_convert_to_hf import _launch

    torch.save(prompt, work / "prompt.pt")
    jobs = work / "jobs.json"
    jobs.write_text(json.dumps({name: str(converted[name]) for name in FAMILIES}))
    run_dir = work / "continued"
    saved = {name: work / f"megatron-save-{name}" for name in ("qwen2", "qwen3")}

    def torchrun(nproc: int) -> list[str]:
        return [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--nnodes=1",
            "--standalone",
        ]

    procs = {
        layout: _launch(
            [
                *torchrun(tp * pp),
                "-m",
                "tests.test_convert_families",
                layout,
                str(jobs),
                str(work / "prompt.pt"),
                str(work / f"logits-{layout}.pt"),
            ]
        )
        for layout, (tp, pp) in LAYOUTS.items()
    }
    procs.update(
        trainer=_launch(
            [
                *torchrun(2),
                "-m",
                "tests.test_convert_from_hf",
                "train",
                str(converted["qwen2-tp2"]),
                str(run_dir),
            ]
        ),
        save=_launch(
            [
                "-m",
                "tests.test_convert_from_hf",
                "save",
                *(str(path) for name in saved for path in (converted[name], saved[name])),
            ]
        ),
    )
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name} failed:\n{out[-4000:]}"
    logits = {
        (name, layout): tensor
        for layout in LAYOUTS
        for name, tensor in torch.load(work / f"logits-{layout}.pt").items()
    }
    return logits, run_dir, saved


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_megatron_logits_match_transformers(name, layout, hf_models, megatron, prompt):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_models[name], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(prompt).logits
    logits = megatron[0][(name, layout)]
    assert logits.shape[-1] == 1024  # padded for TP
    assert (logits[..., :VOCAB] - expected).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_round_trip_is_bit_identical_and_loads_offline(name, hf_models, converted, work, prompt):
    from transformers import AutoModelForCausalLM

    from kumihimo.pretrain.convert.to_hf import convert_to_hf

    back = convert_to_hf(converted[name], work / f"back-{name}", dtype="fp32")
    original, restored = hf_weights(hf_models[name]), hf_weights(back)
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    source, config = (json.loads((folder / "config.json").read_text()) for folder in (hf_models[name], back))
    for key in (
        "architectures",
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "rope_parameters",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == source[key], key
    # what vLLM and transformers 4.x read
    assert (
        config["rope_theta"] == source["rope_parameters"]["rope_theta"] and config["torch_dtype"] == "float32"
    )
    rope_type = source["rope_parameters"]["rope_type"]
    assert (config["rope_scaling"] or {}).get("rope_type", "default") == rope_type
    assert config.get("sliding_window") is None and not config.get("use_sliding_window")
    reloaded = AutoModelForCausalLM.from_pretrained(back, local_files_only=True, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == FAMILIES[name][1]
    original_model = AutoModelForCausalLM.from_pretrained(hf_models[name], dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(prompt).logits, original_model(prompt).logits)


@pytest.mark.slow
def test_trainer_continues_pretraining_qwen2_at_tp2(hf_models, converted, megatron, work):
    """The trainer's TP=2 model holds exactly the Qwen2 weights (tied embeddings, QKV biases; saved
    before any step and exported back bit-identically) and trains on from them; `kumihimo plan`
    counts its parameters (biases, one shared embedding) as each rank held them."""
    from kumihimo.pretrain.checkpoint_format import find_checkpoint
    from kumihimo.pretrain.convert.to_hf import convert_to_hf
    from kumihimo.pretrain.parallel import ParallelLayout
    from kumihimo.pretrain.plan import stage_params

    _logits, run_dir, _saved = megatron
    folder = find_checkpoint(converted["qwen2-tp2"])
    config = configtree.from_dict(TrainConfig, configtree.read_yaml(folder / "run_config.yaml"))
    layout = ParallelLayout.from_config(config, 2)
    for row in json.loads((run_dir / "parameters_per_rank.json").read_text()):
        assert row["parameters"] == stage_params(config.model, layout, 1024, row["pp_rank"]), row
    checkpoints = next(p.parent for p in sorted(run_dir.rglob("latest_checkpointed_iteration.txt")))
    back = convert_to_hf(checkpoints, work / "continued-hf", iteration=0, dtype="fp32")
    assert json.loads((back / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    original, restored = hf_weights(hf_models["qwen2"]), hf_weights(back)
    assert original.keys() == restored.keys()
    assert all(torch.equal(restored[key], tensor) for key, tensor in original.items())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and 0 < metrics[-1]["loss"] < 20
    after = convert_to_hf(checkpoints, work / "continued-hf-1", iteration=1, dtype="fp32")
    trained = hf_weights(after)
    assert not torch.equal(
        trained["model.layers.0.self_attn.q_proj.bias"], original["model.layers.0.self_attn.q_proj.bias"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_checkpoint_is_what_megatron_saves_for_the_model(name, converted, megatron):
    """The streaming writer's metadata for QKV biases and q/k norms equals dist_checkpointing.save's."""
    from torch.distributed.checkpoint import FileSystemReader

    ours, reference = converted[name] / "iter_0000000", megatron[2][name]
    planned, saved = (FileSystemReader(str(folder)).read_metadata() for folder in (ours, reference))
    assert planned.state_dict_metadata.keys() == saved.state_dict_metadata.keys()
    for key, entry in saved.state_dict_metadata.items():
        assert planned.state_dict_metadata[key] == entry, key


# ------------------------------------------------------------------------------------------ reference


def _forward(model, tokens: torch.Tensor, tp: int, pp: int) -> torch.Tensor | None:
    """Full-vocabulary logits on the last pipeline stage (None elsewhere); stages pass activations
    with send/recv, tensor-parallel vocabulary slices are gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if pp > 1:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        if stage > 0:
            hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
            dist.recv(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(tokens, positions, None)
        if stage < pp - 1:
            dist.send(out.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return out
    out = model(tokens, positions, None)
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def _megatron_logits(layout: str, jobs_path: str, prompt_path: str, out_path: str) -> None:
    """In each of the layout's TP x PP torchrun processes: for every checkpoint, build the trainer's
    GPTModel, load the checkpoint with dist_checkpointing and record the logits (one layout per job:
    Megatron's parallel state is set up once per process)."""
    import torch.distributed as dist

    from kumihimo.pretrain import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo")
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kumihimo.pretrain.checkpoint_format import SHARDING_METADATA, find_checkpoint, read_meta
    from kumihimo.pretrain.parallel import ParallelLayout
    from tests.conftest import build_run_model

    tp, pp = LAYOUTS[layout]
    parallel_state.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    prompt = torch.load(prompt_path)
    results = {}
    for name, root in json.loads(Path(jobs_path).read_text()).items():
        folder = find_checkpoint(Path(root))
        data = configtree.read_yaml(folder / "run_config.yaml")
        data["parallelism"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        data.setdefault("runtime", {})["device"] = "cpu"
        data["model"]["transformer_impl"] = "local"
        config = configtree.from_dict(TrainConfig, data)
        meta = read_meta(folder)
        (model,) = build_run_model(
            config, ParallelLayout.from_config(config, tp * pp), meta["padded_vocab_size"]
        )
        sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
        loaded = dist_checkpointing.load(sharded, str(folder))
        model.load_state_dict({key: value for key, value in loaded.items() if key in sharded})
        model.eval()
        with torch.no_grad():
            logits = _forward(model, prompt, tp, pp)
        if logits is not None:
            results[name] = logits
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _megatron_logits(*sys.argv[1:])

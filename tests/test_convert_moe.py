"""Mixture-of-experts conversion: `convert from-hf` / `to-hf` for Qwen3-MoE, Mixtral and Qwen2-MoE, and
`convert upcycle` (plain and Drop-Upcycling).

Tiny random models are built from transformers configs (4 experts, top-2, GQA 4 heads / 2 groups, every
weight random including the norms; Qwen2-MoE with its gated shared expert and softmax-then-top-k routing,
norm_topk_prob=false; each also with dense first layers, mlp_only_layers=[0] of 3 layers for Qwen3-MoE and
[0, 1] for Qwen2-MoE). The fast tests convert in this process: HF -> Megatron -> HF is bit identical (fp32
and bf16), the checkpoint has Megatron's per-expert keys (per-layer keys with dense first layers), the
refusals of other dense-layer patterns, the Drop-Upcycling arithmetic (channel counts, statistics, seeds),
and an upcycled model with a dense first layer exported to transformers with the dense model's logits. One
slow test runs Megatron in one two-process gloo run: logits of the converted checkpoints at EP=1, EP=2 and
TP=2 against transformers'; the trainer's GPTModel saved by `dist_checkpointing.save` (the layout the
streaming writer must reproduce); and the upcycled model's logits against the dense model's. Another
bounds the conversion's memory by a tensor, not a layer's experts.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kumihimo.core.errors import UserError
from kumihimo.pretrain.convert import upcycle
from kumihimo.pretrain.convert.from_hf import check_supported, convert_from_hf
from kumihimo.pretrain.convert.to_hf import convert_to_hf
from tests.test_convert_from_hf import _stored_objects, hf_weights
from tests.test_convert_to_hf import VOCAB, _launch, train_spm

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=False,
)
# name -> (config class, model class, dtype, config changes)
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        torch.float32,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            intermediate_size=96,
            norm_topk_prob=True,
        ),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        torch.float32,
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        torch.float32,
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            intermediate_size=96,
            norm_topk_prob=False,
        ),
    ),
}
# Dense first layers (Hugging Face's mlp_only_layers, kumihimo's model.moe.dense_first_layers): three
# layers, the first one (two for Qwen2-MoE) a dense MLP of intermediate_size, the rest MoE.
FAMILIES["qwen3_moe_dense"] = (
    *FAMILIES["qwen3_moe"][:3],
    {**FAMILIES["qwen3_moe"][3], "num_hidden_layers": 3, "mlp_only_layers": [0]},
)
FAMILIES["qwen2_moe_dense"] = (
    *FAMILIES["qwen2_moe"][:3],
    {**FAMILIES["qwen2_moe"][3], "num_hidden_layers": 3, "mlp_only_layers": [0, 1]},
)
BF16 = ("qwen3_moe", torch.bfloat16)


def make_moe_model(folder: Path, name: str, dtype: torch.dtype, spm_model: Path) -> Path:
    import transformers

    config_class, model_class, _dtype, changes = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**COMMON, **changes}))
    with torch.no_grad():
        for key, param in model.named_parameters():  # norms too, so a swapped norm cannot hide
            # routers wider than the rest: clear top-k choices, so float noise never flips an expert
            std = 0.5 if key.endswith(("mlp.gate.weight", "moe.gate.weight")) else 0.05
            param.normal_(1.0 if param.dim() == 1 else 0.0, std)
    model.to(dtype).save_pretrained(folder)
    shutil.copyfile(spm_model, folder / "tokenizer.model")
    return folder


def load_moe(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def spm_model(work) -> Path:
    return train_spm(work / "tok", seed=1)


@pytest.fixture(scope="module")
def hf_models(work, spm_model) -> dict[str, Path]:
    models = {
        name: make_moe_model(work / f"hf-{name}", name, dtype, spm_model)
        for name, (*_, dtype, _c) in FAMILIES.items()
    }
    models["bf16"] = make_moe_model(work / "hf-bf16", BF16[0], BF16[1], spm_model)
    return models


@pytest.fixture(scope="module")
def converted(hf_models, work) -> dict[str, Path]:
    roots = {}
    for name, folder in hf_models.items():
        roots[name] = convert_from_hf(folder, work / f"ckpt-{name}", ep=2 if name == "qwen3_moe" else 1)
    return roots


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", [*FAMILIES, "bf16"])
def test_hf_megatron_hf_round_trip_is_bit_identical(name, hf_models, converted, work):
    source = hf_models[name]
    back = convert_to_hf(converted[name], work / f"back-{name}", dtype=None)
    original, restored = hf_weights(source), hf_weights(back)
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    before, after = (json.loads((folder / "config.json").read_text()) for folder in (source, back))
    assert after["architectures"] == before["architectures"] and after["model_type"] == before["model_type"]
    for key in (
        "num_hidden_layers",
        "intermediate_size",
        "mlp_only_layers",
        "decoder_sparse_step",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
    ):
        assert after.get(key) == before.get(key), key
    experts = lambda config: config.get("num_experts") or config.get("num_local_experts")  # noqa: E731
    assert experts(after) == experts(before) == 4
    import transformers

    loaded = transformers.AutoConfig.from_pretrained(back)  # transformers reads the exported keys back
    assert loaded.num_experts_per_tok == 2 and loaded.model_type == before["model_type"]


def test_checkpoint_keys_and_run_config(converted):
    """Experts are one tensor per layer with the expert axis first; run_config.yaml carries model.moe
    and the EP asked for; the routing follows norm_topk_prob."""
    import yaml
    from torch.distributed.checkpoint import FileSystemReader

    folder = converted["qwen3_moe"] / "iter_0000000"
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    fc1 = metadata["decoder.layers.mlp.experts.experts.linear_fc1.weight"]
    assert tuple(fc1.size) == (2, 4, 64, 64) and len(fc1.chunks) == 16  # 2 layers x 4 experts x (gate, up)
    assert tuple(metadata["decoder.layers.mlp.router.weight"].size) == (2, 4, 64)
    # the pre-MLP norm under Megatron-LM's MoE name (as Transformer Engine layers key it)
    assert tuple(metadata["decoder.layers.pre_mlp_layernorm.weight"].size) == (2, 64)
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" not in metadata
    config = yaml.safe_load((folder / "run_config.yaml").read_text())
    moe = config["model"]["moe"]
    assert (moe["num_experts"], moe["router_topk"], moe["ffn_hidden_size"], moe["router_pre_softmax"]) == (
        4,
        2,
        32,
        False,
    )
    assert config["parallelism"]["expert_model_parallel_size"] == 2 and config["model"]["family"] == "qwen3"
    qwen2 = yaml.safe_load((converted["qwen2_moe"] / "iter_0000000" / "run_config.yaml").read_text())["model"]
    assert qwen2["moe"]["router_pre_softmax"] is True and qwen2["moe"]["shared_expert_gate"] is True
    assert qwen2["moe"]["shared_expert_ffn_hidden_size"] == 48 and qwen2["add_qkv_bias"] is True


def test_dense_first_layers_are_keyed_per_layer(converted):
    """mlp_only_layers=[0] is model.moe.dense_first_layers=1; Megatron keys each layer by its number
    (moe_layer_freq is a list): layer 0 holds the dense MLP of intermediate_size, layers 1-2 the experts."""
    import yaml
    from torch.distributed.checkpoint import FileSystemReader

    folder = converted["qwen3_moe_dense"] / "iter_0000000"
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert tuple(metadata["decoder.layers.0.mlp.linear_fc1.weight"].size) == (2 * 96, 64)
    assert tuple(metadata["decoder.layers.0.mlp.linear_fc2.weight"].size) == (64, 96)
    for layer in (1, 2):
        assert tuple(metadata[f"decoder.layers.{layer}.mlp.experts.experts.linear_fc1.weight"].size) == (
            4,
            64,
            64,
        )
        assert tuple(metadata[f"decoder.layers.{layer}.mlp.router.weight"].size) == (4, 64)
        assert f"decoder.layers.{layer}.mlp.linear_fc1.weight" not in metadata
        assert tuple(metadata[f"decoder.layers.{layer}.pre_mlp_layernorm.weight"].size) == (64,)
        assert f"decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight" not in metadata
    assert "decoder.layers.0.mlp.router.weight" not in metadata
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in metadata
    assert "decoder.layers.0.pre_mlp_layernorm.weight" not in metadata
    assert not any(key.startswith("decoder.layers.mlp.") for key in metadata)  # nothing stacked
    model = yaml.safe_load((folder / "run_config.yaml").read_text())["model"]
    assert (
        model["ffn_hidden_size"],
        model["moe"]["ffn_hidden_size"],
        model["moe"]["dense_first_layers"],
    ) == (
        96,
        32,
        1,
    )
    qwen2 = yaml.safe_load((converted["qwen2_moe_dense"] / "iter_0000000" / "run_config.yaml").read_text())
    assert qwen2["model"]["moe"]["dense_first_layers"] == 2


def test_unsupported_moe_configs_are_refused(hf_models):
    base = json.loads((hf_models["qwen3_moe"] / "config.json").read_text())
    for change, message in (
        ({"mlp_only_layers": [1]}, r"mlp_only_layers is \[1\]: .*\[0, \.\.\., k-1\]"),
        ({"mlp_only_layers": [1, 3]}, r"mlp_only_layers is \[1, 3\]: .*\[0, \.\.\., k-1\]"),
        ({"mlp_only_layers": [0, 1]}, r"mlp_only_layers is \[0, 1\]: every one of the 2 layers is dense"),
        (
            {"decoder_sparse_step": 2},
            r"decoder_sparse_step is 2 .*\[0, \.\.\., k-1\] with decoder_sparse_step 1",
        ),
    ):
        with pytest.raises(UserError, match=message) as refused:
            check_supported({**base, **change})
        assert "\n" not in str(refused.value)
    assert check_supported({**base, "num_hidden_layers": 3, "mlp_only_layers": [0, 1]}) == "qwen3_moe"
    qwen2 = json.loads((hf_models["qwen2_moe"] / "config.json").read_text())
    with pytest.raises(UserError, match="shared_expert_intermediate_size"):
        check_supported({**qwen2, "shared_expert_intermediate_size": 0})


def test_mixtral_refuses_dense_first_layers():
    """Mixtral has no dense layers: a model without q/k norms or QKV biases (exported as Mixtral) with
    dense first layers is refused in one line that says which families carry them."""
    from kumihimo.pretrain.config import ModelConfig, MoEConfig
    from kumihimo.pretrain.convert.to_hf import export_family

    moe = MoEConfig(num_experts=4, dense_first_layers=1)
    with pytest.raises(UserError, match="dense_first_layers=1: Mixtral has no dense layers") as refused:
        export_family(ModelConfig(num_layers=3, moe=moe))
    assert "\n" not in str(refused.value) and "Qwen3-MoE" in str(refused.value)
    assert export_family(ModelConfig(num_layers=3, qk_layernorm=True, moe=moe)) == "qwen3_moe"


def test_dense_models_refuse_expert_parallelism(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.test_convert_from_hf import HF_CONFIG

    LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).save_pretrained(tmp_path / "dense")
    with pytest.raises(UserError, match="--ep=2 needs a mixture-of-experts model"):
        convert_from_hf(tmp_path / "dense", tmp_path / "out", ep=2)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ memory

MEMORY_CHILD = """
import json, sys
from kumihimo.pretrain.convert.from_hf import convert_from_hf
from kumihimo.pretrain.convert.to_hf import convert_to_hf
def status(field):
    return int(next(line for line in open('/proc/self/status') if line.startswith(field)).split()[1]) * 1024
def peak_growth(convert, *args):
    open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) restarts from the current RSS
    before = status('VmRSS:')
    convert(*args)
    return status('VmHWM:') - before
convert_to_hf(convert_from_hf(sys.argv[1], sys.argv[2]), sys.argv[3], dtype=None)  # imports, one-time setup
growth = {'from-hf': peak_growth(convert_from_hf, sys.argv[4], sys.argv[5])}
growth['to-hf'] = peak_growth(convert_to_hf, sys.argv[5], sys.argv[6], None, None)
print(json.dumps(growth))
"""


def write_moe_folder(folder: Path, layers: int, hidden: int, experts: int, width: int) -> tuple[int, int]:
    """A random fp32 Qwen3-MoE folder written a tensor at a time; returns (largest tensor, one layer's
    experts) in bytes."""
    from kumihimo.pretrain.convert.from_hf import expected_hf_tensors
    from kumihimo.pretrain.convert.mapping import LlamaDims
    from kumihimo.pretrain.convert.to_hf import PlannedTensor, StreamingSafetensorsWriter

    dims = LlamaDims(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=width,
        num_attention_heads=8,
        num_query_groups=2,
        head_dim=hidden // 8,
        megatron_vocab_size=VOCAB,
        hf_vocab_size=VOCAB,
        qk_norm=True,
        num_experts=experts,
        expert_ffn_hidden_size=width,
    )
    planned = [PlannedTensor(name, shape, torch.float32) for name, shape in expected_hf_tensors(dims).items()]
    folder.mkdir()
    writer = StreamingSafetensorsWriter(folder, planned, 10**8)
    generator = torch.Generator().manual_seed(0)
    for tensor in planned:
        writer.write(tensor.name, torch.randn(tensor.shape, generator=generator) * 0.02)
    writer.finish()
    config = dict(
        COMMON,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        head_dim=hidden // 8,
        num_experts=experts,
        num_experts_per_tok=2,
        moe_intermediate_size=width,
        intermediate_size=width,
        norm_topk_prob=True,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        torch_dtype="float32",
    )
    (folder / "config.json").write_text(json.dumps(config))
    return max(t.num_bytes for t in planned), 3 * experts * width * hidden * 4


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_moe_conversion_memory_stays_near_one_tensor_not_one_layer(tmp_path):
    """Peak RSS grows by about one copy of the largest tensor (from-hf) or two (to-hf) while a model
    whose layers hold 32 experts (96 MiB of expert weights a layer) is converted each way: experts are
    streamed one at a time, never a layer's worth."""
    write_moe_folder(tmp_path / "warmup", 1, 64, 2, 32)
    largest, layer = write_moe_folder(tmp_path / "hf", 1, 512, 32, 512)
    names = ("warmup", "warmup-ckpt", "warmup-back", "hf", "ckpt", "back")
    proc = _launch(["-c", MEMORY_CHILD, *(str(tmp_path / name) for name in names)])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    growth = json.loads(out.strip().splitlines()[-1])
    print(
        f"largest tensor {largest / 2**20:.1f} MiB, experts of a layer {layer / 2**20:.0f} MiB, growth {growth}"
    )
    assert growth["from-hf"] < layer / 4 and growth["to-hf"] < layer / 4, (growth, largest, layer)


# ------------------------------------------------------------------------------------------ upcycling math


def test_drop_upcycling_replaces_round_r_channels_per_expert_from_their_statistics():
    gen = torch.Generator().manual_seed(0)
    channels, hidden = 40, 24
    fc1, fc2 = (
        torch.randn(2 * channels, hidden, generator=gen) * 0.1 + 0.3,
        torch.randn(hidden, channels, generator=gen),
    )
    for ratio in (0.0, 0.25, 0.5, 0.33, 1.0):
        subsets = []
        for expert in range(4):
            new1, new2 = upcycle.expert_weights(fc1, fc2, ratio, upcycle.generator(7, 1, expert))
            changed_gate = (new1[:channels] != fc1[:channels]).any(1)
            changed_up = (new1[channels:] != fc1[channels:]).any(1)
            changed_down = (new2 != fc2).any(0)
            # the same channels in all three matrices, exactly round(r x F) of them, and nothing else
            assert torch.equal(changed_gate, changed_up) and torch.equal(changed_gate, changed_down)
            assert int(changed_gate.sum()) == round(ratio * channels), (ratio, expert)
            subsets.append(tuple(changed_gate.nonzero().flatten().tolist()))
            if ratio == 0.0:
                assert torch.equal(new1, fc1) and torch.equal(new2, fc2)  # r=0: plain upcycling
            # reproducible from (seed, layer, expert)
            again = upcycle.expert_weights(fc1, fc2, ratio, upcycle.generator(7, 1, expert))
            assert torch.equal(again[0], new1) and torch.equal(again[1], new2)
        if 0 < ratio < 1:
            assert len(set(subsets)) == 4, ratio  # a different subset per expert
    # replaced values follow the statistics of the weights they replace (up half: mean 0.3, std 0.1)
    wide = torch.randn(2 * 4000, 64, generator=gen) * 0.1 + 0.3
    new1, _ = upcycle.expert_weights(
        wide, torch.randn(64, 4000, generator=gen), 0.5, upcycle.generator(1, 0, 0)
    )
    replaced = new1[4000:][(new1[4000:] != wide[4000:]).any(1)]
    assert abs(replaced.mean().item() - 0.3) < 0.01 and abs(replaced.std().item() - 0.1) < 0.01


def test_generator_seeds_are_distinct_per_layer_and_expert():
    draws = {
        key: torch.randn(4, generator=upcycle.generator(*key)).tolist()
        for key in [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0)]
    }
    assert len({tuple(v) for v in draws.values()}) == 4


# ------------------------------------------------------------------------------------------ Megatron side


@pytest.fixture(scope="module")
def dense_root(work, spm_model) -> Path:
    """A dense Qwen3 checkpoint (imported from a random Hugging Face model), for upcycling."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(1)
    model = Qwen3ForCausalLM(Qwen3Config(**COMMON, intermediate_size=48))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.05)
    model.save_pretrained(work / "hf-dense")
    shutil.copyfile(spm_model, work / "hf-dense" / "tokenizer.model")
    return convert_from_hf(work / "hf-dense", work / "ckpt-dense")


@pytest.fixture(scope="module")
def upcycled(dense_root, work) -> dict[str, Path]:
    return {
        "plain": upcycle.upcycle_checkpoint(
            dense_root, work / "up-plain", num_experts=4, router_topk=2, seed=3
        ),
        "r0": upcycle.upcycle_checkpoint(dense_root, work / "up-r0", 4, 2, drop_ratio=0.0, seed=5),
        "drop": upcycle.upcycle_checkpoint(dense_root, work / "up-drop", 4, 2, drop_ratio=0.5, seed=3),
        "drop-again": upcycle.upcycle_checkpoint(
            dense_root, work / "up-drop-again", 4, 2, drop_ratio=0.5, seed=3
        ),
        "dense-first": upcycle.upcycle_checkpoint(
            dense_root, work / "up-dense-first", 4, 2, seed=3, dense_first_layers=1
        ),
    }


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    from kumihimo.pretrain.convert.to_hf import TorchDistReader

    reader = TorchDistReader(root / "iter_0000000")
    return {key: reader.read({key: (key, None)})[key] for key in reader.tensors}


def test_upcycled_checkpoint_copies_the_dense_weights(dense_root, upcycled):
    """Attention, norms, embedding and head are the dense ones; every expert of plain upcycling is the
    dense MLP; r=0 differs from plain only in the router (another seed); Drop-Upcycling changes exactly
    round(0.5 x 48) = 24 channels of each expert, reproducibly."""
    dense, plain, r0 = _tensors(dense_root), _tensors(upcycled["plain"]), _tensors(upcycled["r0"])
    drop, again = _tensors(upcycled["drop"]), _tensors(upcycled["drop-again"])
    for layer in range(2):
        for name, moe_name in (
            ("self_attention.linear_qkv.weight",) * 2,
            ("self_attention.linear_proj.weight",) * 2,
            ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),  # fused in fc1 when dense
        ):
            assert torch.equal(
                plain[f"decoder.layers.{moe_name}"][layer], dense[f"decoder.layers.{name}"][layer]
            )
        fc1, fc2 = (
            dense["decoder.layers.mlp.linear_fc1.weight"][layer],
            dense["decoder.layers.mlp.linear_fc2.weight"][layer],
        )
        experts = "decoder.layers.mlp.experts.experts."
        for expert in range(4):
            assert torch.equal(plain[experts + "linear_fc1.weight"][layer, expert], fc1)
            assert torch.equal(plain[experts + "linear_fc2.weight"][layer, expert], fc2)
            changed = (drop[experts + "linear_fc2.weight"][layer, expert] != fc2).any(0)
            assert int(changed.sum()) == 24
        router = "decoder.layers.mlp.router.weight"
        assert not torch.equal(plain[router][layer], r0[router][layer])
    for key, tensor in plain.items():
        if not key.endswith("router.weight"):
            assert torch.equal(r0[key], tensor), key
    assert drop.keys() == again.keys() and all(torch.equal(drop[k], again[k]) for k in drop)
    meta = json.loads((upcycled["drop"] / "iter_0000000" / "kumihimo.json").read_text())
    assert meta["source"]["method"] == "drop-upcycling" and meta["source"]["drop_ratio"] == 0.5


def test_upcycle_refusals(dense_root, upcycled, work):
    with pytest.raises(UserError, match="already a mixture of experts"):
        upcycle.upcycle_checkpoint(upcycled["plain"], work / "twice", 4, 2)
    with pytest.raises(UserError, match="--drop-ratio=1.5"):
        upcycle.upcycle_checkpoint(dense_root, work / "bad", 4, 2, drop_ratio=1.5)
    with pytest.raises(UserError, match="at least 2 experts"):
        upcycle.upcycle_checkpoint(dense_root, work / "bad", 1, 1)
    with pytest.raises(UserError, match=r"--dense-first-layers=2 is not within 0\.\.1"):
        upcycle.upcycle_checkpoint(dense_root, work / "bad", 4, 2, dense_first_layers=2)
    assert not (work / "bad").exists() and not (work / "twice").exists()


def test_upcycling_with_dense_first_layers_exports_the_dense_model(dense_root, upcycled, work):
    """--dense-first-layers=1 copies layer 0's dense MLP as it is and makes layer 1 experts (keyed per
    layer, as Megatron keys a model whose layers differ); exported, it is a Qwen3-MoE with
    mlp_only_layers=[0] whose transformers logits are the dense model's (identical experts, top-k then
    softmax)."""
    dense, up = _tensors(dense_root), _tensors(upcycled["dense-first"])
    for name in ("linear_fc1.weight", "linear_fc2.weight"):
        assert torch.equal(up[f"decoder.layers.0.mlp.{name}"], dense[f"decoder.layers.mlp.{name}"][0])
        for expert in range(4):
            assert torch.equal(
                up[f"decoder.layers.1.mlp.experts.experts.{name}"][expert],
                dense[f"decoder.layers.mlp.{name}"][1],
            )
    norm = dense["decoder.layers.mlp.linear_fc1.layer_norm_weight"]
    assert torch.equal(up["decoder.layers.0.mlp.linear_fc1.layer_norm_weight"], norm[0])
    assert torch.equal(up["decoder.layers.1.pre_mlp_layernorm.weight"], norm[1])
    assert (
        not {
            "decoder.layers.0.mlp.router.weight",
            "decoder.layers.0.pre_mlp_layernorm.weight",
            "decoder.layers.1.mlp.linear_fc1.weight",
            "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
        }
        & up.keys()
    )
    exported = convert_to_hf(upcycled["dense-first"], work / "up-dense-first-hf", dtype=None)
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["mlp_only_layers"], config["decoder_sparse_step"]) == (
        "qwen3_moe",
        [0],
        1,
    )
    assert (config["intermediate_size"], config["moe_intermediate_size"]) == (48, 48)
    prompt = torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_moe(work / "hf-dense")(prompt).logits
        logits = load_moe(exported)(prompt).logits
    error = (logits - expected).abs().max().item()
    print(
        f"upcycled with a dense first layer, exported: max |logit difference| to the dense model {error:.2e}"
    )
    assert error < 1e-5


def test_cli_upcycle(dense_root, work):
    from kumihimo.cli import main

    out = work / "cli-up"
    argv = ["convert", "upcycle", "--checkpoint", str(dense_root), "--output", str(out), "--num-experts", "4"]
    assert main([*argv, "--drop-ratio", "0.25", "--seed", "9", "--ep", "2", "--dense-first-layers", "1"]) == 0
    import yaml

    config = yaml.safe_load((out / "iter_0000000" / "run_config.yaml").read_text())
    assert (
        config["model"]["moe"]["num_experts"] == 4
        and config["model"]["moe"]["dense_first_layers"] == 1
        and config["parallelism"]["expert_model_parallel_size"] == 2
    )


# name -> (TP, EP, families): Megatron logits of the converted checkpoints at each layout, all in one
# two-process run (EP=1 and TP=1 there is two data-parallel replicas)
LAYOUTS = {
    "ep1": (1, 1, list(FAMILIES)),
    "ep2": (1, 2, ["qwen3_moe", "qwen3_moe_dense"]),
    "tp2": (2, 1, ["qwen3_moe", "qwen3_moe_dense"]),
}
# checkpoints whose model is also saved by dist_checkpointing.save, to compare with the streamed files
# (stacked layers; layers keyed per number, dense and MoE, with a shared expert)
SAVED = ("qwen2_moe", "qwen2_moe_dense")


@pytest.mark.slow
def test_megatron_logits_match_transformers_at_ep1_ep2_tp2_and_upcycling_keeps_the_dense_output(
    hf_models, converted, dense_root, upcycled, work
):
    """Converted checkpoints give transformers' logits (1e-4, fp32) at EP=1, EP=2 and TP=2 (gloo, two
    processes), dense first layers (mlp_only_layers) included; the upcycled model (plain, r=0, and with a
    dense first layer) gives the dense model's logits (1e-6); the streamed checkpoint has the keys, shapes, chunks and objects of
    dist_checkpointing.save on the trainer's MoE GPTModel (Qwen2-MoE: router, experts, shared expert and
    its gate; with dense first layers, every layer keyed by its number)."""
    prompt = torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(prompt, work / "prompt.pt")
    saves = {name: work / f"megatron-save-{name}" for name in SAVED}
    (work / "saves.json").write_text(
        json.dumps({str(converted[n]): str(folder) for n, folder in saves.items()})
    )
    plan = {
        layout: (tp, ep, [str(converted[name]) for name in names])
        for layout, (tp, ep, names) in LAYOUTS.items()
    }
    plan["ep1"][2].extend(
        str(root) for root in (dense_root, *(upcycled[k] for k in ("plain", "r0", "dense-first")))
    )
    # TP=2 in a run of its own: Megatron keeps TP state that a second initialize_model_parallel misses
    runs = {"ep": {k: plan[k] for k in ("ep1", "ep2")}, "tp": {"tp2": plan["tp2"]}}
    procs = {}
    for run, layouts in runs.items():
        (work / f"plan-{run}.json").write_text(json.dumps(layouts))
        procs[run] = _launch(
            [
                "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1", "--standalone",
                "-m", "tests.test_convert_moe", "logits", str(work / "prompt.pt"), str(work / f"plan-{run}.json"),
                str(work / f"logits-{run}.pt"), str(work / "saves.json"),
            ]
        )  # fmt: skip
    results = {}
    for run, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, "\n".join(line for line in out.splitlines() if "[rank0]" in line)[-3000:]
        results.update(torch.load(work / f"logits-{run}.pt"))
    for layout, (_tp, _ep, names) in LAYOUTS.items():
        for name, logits in zip(names, results[layout]):
            with torch.no_grad():
                expected = load_moe(hf_models[name])(prompt).logits
            error = (logits[..., :VOCAB] - expected).abs().max().item()
            print(f"{layout} {name}: max |logit difference| {error:.2e}")
            assert error < 1e-4, (layout, name, error)
    dense, *upcycled_logits = results["ep1"][len(FAMILIES) :]
    for logits in upcycled_logits:  # plain, r=0, a dense first layer
        assert (logits - dense).abs().max().item() < 1e-6

    from torch.distributed.checkpoint import FileSystemReader

    for name, saved in saves.items():
        ours = converted[name] / "iter_0000000"
        planned, reference = (FileSystemReader(str(folder)).read_metadata() for folder in (ours, saved))
        assert planned.state_dict_metadata.keys() == reference.state_dict_metadata.keys(), name
        for key, entry in reference.state_dict_metadata.items():
            assert planned.state_dict_metadata[key] == entry, (name, key)
        assert _stored_objects(ours) == _stored_objects(saved), name


def _megatron_logits(prompt_path: str, plan_path: str, out_path: str, saves_path: str) -> None:
    """In every torchrun process, for each layout of the plan ({layout: [TP, EP, roots]}): the trainer's
    GPTModel at that TP x EP loads each checkpoint (saved at any layout) and computes the prompt's
    logits, gathered over TP; rank 0 saves them all. A model loaded from a root of `saves_path`
    ({root: folder}) at the first layout is also saved to that folder by dist_checkpointing.save, as the
    trainer saves it."""
    import torch.distributed as dist

    from kumihimo.pretrain import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo")
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kumihimo.core import configtree
    from kumihimo.pretrain.checkpoint_format import SHARDING_METADATA, read_meta
    from kumihimo.pretrain.checkpointing import _model_sharded_state_dict
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.parallel import ParallelLayout
    from tests.conftest import build_run_model

    prompt = torch.load(prompt_path)
    saves = json.loads(Path(saves_path).read_text())
    world = dist.get_world_size()
    results = {}
    for layout_name, (tp, ep, roots) in json.loads(Path(plan_path).read_text()).items():
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
        results[layout_name] = []
        for root in map(Path, roots):
            folder = root / "iter_0000000"
            data = configtree.read_yaml(folder / "run_config.yaml")
            data["parallelism"] = {
                "tensor_model_parallel_size": tp,
                "expert_model_parallel_size": ep,
                "sequence_parallel": tp > 1,  # Megatron-Core's MoE under TP needs it
            }
            data.setdefault("runtime", {})["device"] = "cpu"
            data["schedule"] = {**data.get("schedule", {}), "global_batch_size": 2 * world // tp}
            config = configtree.from_dict(TrainConfig, data)
            meta = read_meta(folder)
            (model,) = build_run_model(
                config, ParallelLayout.from_config(config, world), meta["padded_vocab_size"]
            )
            sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
            loaded = dist_checkpointing.load(sharded, str(folder))
            model.load_state_dict({key: value for key, value in loaded.items() if key in sharded})
            model.eval()
            with torch.no_grad():
                positions = torch.arange(prompt.shape[1]).expand_as(prompt)
                results[layout_name].append(
                    gather_from_tensor_model_parallel_region(model(prompt, positions, None))
                )
            save_to = saves.get(str(root))
            if save_to is not None and not Path(save_to).exists():
                dist.barrier()
                if dist.get_rank() == 0:
                    Path(save_to).mkdir()
                dist.barrier()
                state = _model_sharded_state_dict([model])
                dist_checkpointing.save(state, save_to, content_metadata=SHARDING_METADATA)
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "logits":
        _megatron_logits(*arguments)

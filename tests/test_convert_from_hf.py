"""`kumihimo convert from-hf`: HF -> Megatron -> HF is bit-identical, and the trainer starts from it.

Random LlamaForCausalLM models (GQA 4 heads / 2 groups, every weight random including the norms, a
1000-piece SentencePiece tokenizer) are converted in one subprocess (the first through the CLI).
Then, at the same time: the Megatron model (TP=1) computes logits from the fp32 checkpoint, the
trainer at TP=2 (torchrun, 2 processes) loads its weights through `checkpoint.pretrained` (weights
only), saves a full checkpoint before any step, and trains one, and the trainer's GPTModel at TP=1
is saved by `dist_checkpointing.save` as the reference layout the streaming writer must reproduce.
The writer's memory bound is checked on a 16-layer model in a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kumihimo.core.errors import UserError
from kumihimo.pretrain.convert import from_hf
from kumihimo.pretrain.convert.from_hf import (
    HFTensors,
    check_supported,
    convert_from_hf,
    expected_hf_tensors,
    plan_chunks,
    produce,
    read_hf_model,
)
from kumihimo.pretrain.convert.mapping import TRANSFORMS, LlamaDims
from kumihimo.pretrain.convert.to_hf import convert_to_hf
from tests.test_convert_to_hf import VOCAB, _launch, load_hf, train_spm

pytestmark = pytest.mark.slow  # conversion plus Megatron and trainer runs in subprocesses

HF_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
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
)
# Odd sizes at TP=3 x PP=2: every split (heads, query groups, FFN rows, padded vocabulary) is uneven
# somewhere, and the vocabulary (1001 > the tokenizer's 1000) keeps an extra row through padding.
ODD_SHAPES = dict(
    hidden_size=96,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=16,
    intermediate_size=201,
    vocab_size=VOCAB + 1,
)
# name -> (dtype, tied embeddings, --tp, --pp, config.json changes)
MODELS = {
    "fp32": (torch.float32, False, 2, 1, {}),
    "bf16": (torch.bfloat16, False, 1, 2, {}),
    "tied": (torch.float32, True, 1, 1, {}),
    "tp3pp2": (torch.float32, False, 3, 2, ODD_SHAPES),
}


def make_hf_model(folder: Path, dtype: torch.dtype, tied: bool, spm_model: Path, changes: dict) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**HF_CONFIG, **changes}, tie_word_embeddings=tied))
    with torch.no_grad():
        for param in model.parameters():  # norms too, so a swapped norm cannot hide
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.05)
    model.to(dtype).save_pretrained(folder)
    shutil.copyfile(spm_model, folder / "tokenizer.model")
    return folder


def hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("from_hf")


@pytest.fixture(scope="module")
def hf_models(work) -> dict[str, Path]:
    spm_model = train_spm(work / "tok", seed=1)
    return {
        name: make_hf_model(work / f"hf-{name}", dtype, tied, spm_model, changes)
        for name, (dtype, tied, _tp, _pp, changes) in MODELS.items()
    }


@pytest.fixture(scope="module")
def converted(hf_models, work) -> dict[str, Path]:
    """Checkpoint roots from `kumihimo convert from-hf` (one process; the first by the CLI)."""
    roots = {name: work / f"ckpt-{name}" for name in MODELS}
    calls = [
        f"convert_from_hf({str(hf_models[n])!r}, {str(roots[n])!r}, tp={tp}, pp={pp})"
        for n, (_dtype, _tied, tp, pp, _changes) in MODELS.items()
    ]
    code = (
        "import sys\nfrom kumihimo.cli import main\nfrom kumihimo.pretrain.convert.from_hf import convert_from_hf\n"
        f"assert main(['convert', 'from-hf', '--model', {str(hf_models['fp32'])!r}, '--output', "
        f"{str(roots['fp32'])!r}, '--tp', '2']) == 0\n" + "\n".join(calls[1:])
    )
    proc = _launch(["-c", code])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return roots


@pytest.fixture(scope="module")
def megatron(converted, work):
    """(Megatron TP=1 logits for the fp32 checkpoint, the trainer's TP=2 run dir, {name: the trainer's
    model saved by dist_checkpointing at TP=1}), run concurrently."""
    prompt = torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(prompt, work / "prompt.pt")
    run_dir = work / "continued"
    saved = {name: work / f"megatron-save-{name}" for name in ("fp32", "bf16")}
    procs = {
        "reference": _launch(
            [
                "-m",
                "tests.test_convert_to_hf",
                str(work / "prompt.pt"),
                str(work / "ref.pt"),
                str(converted["fp32"]),
            ]
        ),
        "trainer": _launch(
            [
                "-m",
                "torch.distributed.run",
                "--nproc-per-node=2",
                "--nnodes=1",
                "--standalone",
                "-m",
                "tests.test_convert_from_hf",
                "train",
                str(converted["fp32"]),
                str(run_dir),
            ]
        ),
        "save": _launch(
            [
                "-m",
                "tests.test_convert_from_hf",
                "save",
                *(str(path) for name in saved for path in (converted[name], saved[name])),
            ]
        ),
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
    (reference,) = torch.load(work / "ref.pt")
    return prompt, reference, run_dir, saved


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_megatron_hf_round_trip_is_bit_identical(name, hf_models, converted, work):
    dtype, tied, tp, _pp, _changes = MODELS[name]
    back = convert_to_hf(
        converted[name], work / f"back-{name}", dtype="fp32" if dtype == torch.float32 else "bf16"
    )
    original, restored = hf_weights(hf_models[name]), hf_weights(back)
    assert ("lm_head.weight" in restored) is not tied  # tied embeddings stay tied (no lm_head tensor)
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    source, config = (json.loads((folder / "config.json").read_text()) for folder in (hf_models[name], back))
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "max_position_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    ):
        assert config[key] == source[key], key
    # transformers 5 writes rope_parameters, 4.x a top-level rope_theta; the exported config has both
    assert from_hf.rope_theta(config) == from_hf.rope_theta(source) == HF_CONFIG["rope_theta"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]


def test_checkpoint_layout_and_metadata(converted):
    root = converted["fp32"]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    meta = json.loads((root / "iter_0000000" / "kumihimo.json").read_text())
    assert meta["weights_only"] is True and (meta["vocab_size"], meta["padded_vocab_size"]) == (VOCAB, 1024)
    assert Path(meta["tokenizer"]["path"]) == (root / "tokenizer" / "tokenizer.model").resolve()
    import yaml

    config = yaml.safe_load((root / "iter_0000000" / "run_config.yaml").read_text())
    assert config["parallelism"]["tensor_model_parallel_size"] == 2
    assert config["model"]["num_query_groups"] == 2 and config["model"]["rotary_base"] == 50000
    assert (
        config["precision"]["params_dtype"] == "fp32"
        and config["data"]["tokenizer"] == meta["tokenizer"]["path"]
    )
    bf16 = yaml.safe_load((converted["bf16"] / "iter_0000000" / "run_config.yaml").read_text())
    assert (
        bf16["precision"]["params_dtype"] == "bf16"
        and bf16["parallelism"]["pipeline_model_parallel_size"] == 2
    )


# ------------------------------------------------------------------------------------------ Megatron side


def test_megatron_logits_match_hf(hf_models, megatron):
    prompt, reference, _run_dir, _saved = megatron
    with torch.no_grad():
        logits = load_hf(hf_models["fp32"])(prompt).logits
    assert (reference["logits"][..., :VOCAB] - logits).abs().max().item() < 1e-4


def test_trainer_at_tp2_starts_from_the_weights(hf_models, megatron, work):
    """The trainer's TP=2 model holds exactly the HF weights (saved before any step, converted back
    bit-identically) and trains on from them (step 1 saved, finite loss)."""
    _prompt, _reference, run_dir, _saved = megatron
    back = convert_to_hf(run_dir / "ckpt", work / "continued-hf", iteration=0, dtype="fp32")
    original, restored = hf_weights(hf_models["fp32"]), hf_weights(back)
    assert all(torch.equal(restored[key], tensor) for key, tensor in original.items())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and 0 < metrics[-1]["loss"] < 20
    assert (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def _stored_objects(folder: Path) -> dict[str, object]:
    """The non-tensor entries of a torch_dist folder (`_extra_state` objects, common state), unpickled."""
    import io

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(str(folder)).read_metadata()
    objects = {}
    for index, info in metadata.storage_data.items():
        if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
            with open(folder / info.relative_path, "rb") as handle:
                handle.seek(info.offset)
                objects[index.fqn] = torch.load(io.BytesIO(handle.read(info.length)), weights_only=False)
    return objects


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_checkpoint_is_what_megatron_saves_for_the_model(name, converted, megatron):
    """Keys, global shapes, dtypes, chunks, `_extra_state` objects and common state equal those of
    `dist_checkpointing.save` on the trainer's GPTModel (TP=1, Float16Module for bf16, as the trainer
    builds it), although the streaming writer never builds the model."""
    from torch.distributed.checkpoint import FileSystemReader

    ours, reference = converted[name] / "iter_0000000", megatron[3][name]
    planned, saved = (FileSystemReader(str(folder)).read_metadata() for folder in (ours, reference))
    assert planned.state_dict_metadata.keys() == saved.state_dict_metadata.keys()
    for key, entry in saved.state_dict_metadata.items():
        assert planned.state_dict_metadata[key] == entry, key
    assert _stored_objects(ours) == _stored_objects(reference)
    assert json.loads((ours / "metadata.json").read_text()) == json.loads(
        (reference / "metadata.json").read_text()
    )


# ------------------------------------------------------------------------------------------ streaming


@pytest.mark.parametrize("groups,stored_dtype", [(2, torch.float32), (1, torch.float16)])
def test_chunks_read_in_place_equal_the_transforms(groups, stored_dtype, tmp_path, monkeypatch):
    """Each chunk equals the table's from_hf transform on the whole tensors, whether its rows are read
    straight into place (identity, gate/up halves, padded vocabulary, QKV with one group) or not
    (QKV with two groups), also when fp16 rows are converted to fp32 block by block."""
    from safetensors.torch import save_file

    monkeypatch.setattr(from_hf, "CONVERT_BLOCK_BYTES", 1000)
    dims = LlamaDims(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=groups,
        head_dim=16,
        megatron_vocab_size=128,
        hf_vocab_size=100,
    )
    generator = torch.Generator().manual_seed(0)
    weights = {
        name: torch.randn(shape, generator=generator).to(stored_dtype)
        for name, shape in expected_hf_tensors(dims).items()
    }
    save_file(weights, tmp_path / "model.safetensors")
    shape = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=100
    )
    (tmp_path / "config.json").write_text(json.dumps(shape))
    tensors = HFTensors(read_hf_model(tmp_path))
    tensors.check(expected_hf_tensors(dims))
    for chunk in plan_chunks(dims):
        if chunk.rule is None:
            continue
        parts = [weights[name].float() for name in chunk.rule.hf_names(chunk.layer)]
        expected = TRANSFORMS[chunk.rule.transform].from_hf(parts, dims)[chunk.rows[0] : chunk.rows[1]]
        data = produce(chunk, tensors, dims, torch.float32)
        assert torch.equal(data if chunk.layer is None else data[0], expected), (chunk.key, chunk.layer)
        assert data.untyped_storage().nbytes() == data.nbytes  # torch.save writes the whole storage


MEMORY_LAYERS = 16
MEMORY_CONFIG = dict(
    HF_CONFIG,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=MEMORY_LAYERS,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=1024,
    torch_dtype="float32",
    model_type="llama",
)
# A one-layer model converted first pays for lazy imports and one-time setup before the baseline.
WARMUP_CONFIG = dict(MEMORY_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=1, head_dim=8)
MEMORY_CHILD = """
import json, sys
from kumihimo.pretrain.convert.from_hf import convert_from_hf
def status(field):
    return int(next(line for line in open('/proc/self/status') if line.startswith(field)).split()[1]) * 1024
convert_from_hf(sys.argv[1], sys.argv[2])
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) restarts from the current RSS
before = status('VmRSS:')
convert_from_hf(sys.argv[3], sys.argv[4])
print(json.dumps({'before': before, 'peak': status('VmHWM:')}))
"""


def write_layered_hf_model(folder: Path, config: dict) -> tuple[int, int]:
    """A random fp32 Llama folder, one safetensors file per layer (plus one for the rest), written a
    layer at a time; returns (bytes of weights, bytes of the largest layer)."""
    from safetensors.torch import save_file

    folder.mkdir()
    dims = LlamaDims(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=config["num_attention_heads"],
        num_query_groups=config["num_key_value_heads"],
        head_dim=config["head_dim"],
        megatron_vocab_size=config["vocab_size"],
        hf_vocab_size=config["vocab_size"],
    )
    shapes = expected_hf_tensors(dims)
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        file = (
            f"layer-{name.split('.')[2]}.safetensors"
            if name.startswith("model.layers.")
            else "rest.safetensors"
        )
        groups.setdefault(file, {})[name] = shape
    generator = torch.Generator().manual_seed(0)
    sizes = []
    for file, group in groups.items():
        tensors = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in group.items()}
        save_file(tensors, folder / file)
        sizes.append(sum(t.nbytes for t in tensors.values()))
    index = {
        "metadata": {"total_size": sum(sizes)},
        "weight_map": {name: file for file, group in groups.items() for name in group},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return sum(sizes), max(sizes)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_conversion_memory_stays_near_one_layer_not_the_model(tmp_path):
    """Peak RSS grows by well under two layers' worth while a 16-layer model (~250 MB) is converted,
    so the model is never held whole (building it, or reading every tensor first, adds >= its size)."""
    write_layered_hf_model(tmp_path / "warmup", WARMUP_CONFIG)
    model_bytes, layer_bytes = write_layered_hf_model(tmp_path / "hf", MEMORY_CONFIG)
    proc = _launch(
        ["-c", MEMORY_CHILD, *(str(tmp_path / name) for name in ("warmup", "warmup-ckpt", "hf", "ckpt"))]
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    growth = result["peak"] - result["before"]
    assert growth < 2 * layer_bytes, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB converting a "
        f"{model_bytes / 2**20:.0f} MiB model ({layer_bytes / 2**20:.0f} MiB a layer)"
    )


# ------------------------------------------------------------------------------------------ errors


def test_unsupported_models_are_refused(hf_models, work):
    with pytest.raises(UserError, match="no config.json"):
        read_hf_model(work)
    base = json.loads((hf_models["fp32"] / "config.json").read_text())
    for change, message in (
        ({"model_type": "gemma"}, "model_type='gemma'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 5e5}}, "rope_scaling"),
    ):
        with pytest.raises(UserError, match=message):
            check_supported({**base, **change})
    empty = work / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(base))
    with pytest.raises(UserError, match="no safetensors weights"):
        convert_from_hf(empty, work / "out")
    (empty / "config.json").write_text('{"model_type": "llama",')  # issue 23: a JSONDecodeError traceback
    with pytest.raises(UserError, match=r"config.json is not valid JSON \("):
        convert_from_hf(empty, work / "out")
    with pytest.raises(UserError, match="already exists"):
        convert_from_hf(hf_models["fp32"], hf_models["bf16"])


def test_bad_weights_are_refused_and_leave_no_output(hf_models, work):
    """Unknown, missing or misshapen tensors are refused before anything is written; a file that
    ends early fails mid-write. Either way no output folder (nor its staging folder) is left."""
    from safetensors.torch import load_file, save_file

    weights = load_file(hf_models["fp32"] / "model.safetensors")
    config = json.loads((hf_models["fp32"] / "config.json").read_text())
    cases = {
        "extra": (
            {**weights, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
            config,
            "unsupported architecture: model.layers.0.self_attn.q_proj.bias",
        ),
        "missing": (
            {k: v for k, v in weights.items() if k != "model.norm.weight"},
            config,
            "lacks tensor model.norm.weight",
        ),
        "shape": (
            weights,
            {**config, "intermediate_size": 128},
            r"has shape \[192, 64\] but config.json implies",
        ),
        "truncated": (weights, config, "truncated"),
        # issue 23: a NaN weight was published as a checkpoint; an invalid config.json was a traceback
        "nan": (
            {**weights, "model.norm.weight": torch.full_like(weights["model.norm.weight"], float("nan"))},
            config,
            "the weights of .* hold NaN or Inf values",
        ),
        "config-missing-key": (
            weights,
            {k: v for k, v in config.items() if k != "hidden_size"},
            "hidden_size=None",
        ),
    }
    for name, (tensors, model_config, message) in cases.items():
        folder = work / f"bad-{name}"
        folder.mkdir()
        save_file(tensors, folder / "model.safetensors")
        if name == "truncated":
            os.truncate(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 100)
        (folder / "config.json").write_text(json.dumps(model_config))
        with pytest.raises(UserError, match=message):
            convert_from_hf(folder, work / f"out-{name}")
        assert not (work / f"out-{name}").exists() and not list(work.glob(f".out-{name}.tmp-*")), name


# ------------------------------------------------------------------------------------------ trainer run


def _continue_pretraining(root: str, run_dir: str) -> None:
    """In every torchrun process: the trainer at the checkpoint's TP=2 layout starts from it through
    `checkpoint.pretrained` (weights only), saves at step 0, then trains one step."""
    from kumihimo.core import configtree
    from kumihimo.pretrain.checkpoint_format import find_checkpoint
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.distributed import destroy
    from kumihimo.pretrain.training import Trainer

    folder = find_checkpoint(Path(root))
    config = configtree.load(
        TrainConfig,
        folder / "run_config.yaml",
        [
            "data.mock=true",
            "runtime.device=cpu",
            f"output_dir={run_dir}",
            f"checkpoint.dir={run_dir}/ckpt",
            f"checkpoint.pretrained={root}",
            "schedule.train_iters=1",
            "schedule.lr_warmup_iters=0",
            "schedule.global_batch_size=2",
            "schedule.micro_batch_size=1",
            "schedule.eval_interval=0",
        ],
    )
    trainer = Trainer(config)
    try:
        trainer.setup()
        assert trainer.state.iteration == 0
        trainer.save()  # to the checkpoint folder, before any step
        trainer.train()
    finally:
        destroy()


def _save_megatron_model(pairs: list[str]) -> None:
    """For each (converted root, output folder): build the trainer's GPTModel at TP=1/PP=1 from the
    root's run_config.yaml as the trainer builds it and save it with dist_checkpointing.save, as
    conversion did before it streamed. Weights stay random: only the layout is compared."""
    import torch.distributed as dist

    from kumihimo.pretrain import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import Float16Module

    from kumihimo.core import configtree
    from kumihimo.pretrain import checkpoint_format, checkpointing
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.parallel import ParallelLayout
    from tests.conftest import build_run_model

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    for root, out in zip(pairs[::2], pairs[1::2]):
        folder = checkpoint_format.find_checkpoint(Path(root))
        config = configtree.load(
            TrainConfig,
            folder / "run_config.yaml",
            [
                "data.mock=true",
                "runtime.device=cpu",
                "model.transformer_impl=local",
                "parallelism.tensor_model_parallel_size=1",
                "parallelism.pipeline_model_parallel_size=1",
            ],
        )
        padded = checkpoint_format.read_meta(folder)["padded_vocab_size"]
        (model,) = build_run_model(config, ParallelLayout.from_config(config, 1), padded)
        if config.precision.params_dtype == "bf16":
            model = Float16Module(model.config, model)
        Path(out).mkdir()
        dist_checkpointing.save(
            checkpointing._model_sharded_state_dict([model]),
            out,
            content_metadata=checkpoint_format.SHARDING_METADATA,
        )


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "train":
        _continue_pretraining(*arguments)
    else:
        _save_megatron_model(arguments)

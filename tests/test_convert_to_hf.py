"""`kumihimo convert to-hf`: logits of transformers' LlamaForCausalLM match the Megatron model.

Real checkpoints come from the trainer (`kumihimo train`, mock data, a 1000-piece SentencePiece
tokenizer so the vocabulary is unpadded 1000 -> padded 1024) saved at TP=1, TP=2 and PP=2, with
GQA of 4 heads in 2 query groups. The Megatron reference logits are computed by building the
GPTModel at TP=1/PP=1 and loading each checkpoint with dist_checkpointing (one subprocess for all,
since Megatron's process-global state should not leak into the test process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kumihimo.core.errors import UserError
from kumihimo.pretrain.convert import mapping
from kumihimo.pretrain.convert.to_hf import (
    PlannedTensor,
    TorchDistReader,
    check_architecture,
    convert_to_hf,
    dims_for,
    open_checkpoint,
    plan_shards,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # training runs at several layouts, then conversion

TINY = "configs/pretrain/tiny-cpu.yaml"
VOCAB = 1000
LAYOUTS = {
    "tp1": ((), 1),
    "tp2": (("parallelism.tensor_model_parallel_size=2",), 2),
    "pp2": (("parallelism.pipeline_model_parallel_size=2",), 2),
}
NEW_TOKENS = 6


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


def train_spm(prefix: Path, seed: int) -> Path:
    """A 1000-piece SentencePiece model trained on synthetic text (about a second)."""
    import sentencepiece as spm

    from kumihimo.tokenizer import synthetic

    texts = [doc for lang in ("ja", "en") for doc in synthetic.documents(lang, 800, seed=seed)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=VOCAB,
        model_type="unigram",
        byte_fallback=True,
        pad_id=3,
        num_threads=2,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_model(work) -> Path:
    return train_spm(work / "tok", seed=1)


def _launch(args: list[str], threads: int = 1) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def megatron(work, spm_model, prompt) -> tuple[dict[str, Path], dict[str, dict[str, torch.Tensor]]]:
    """Checkpoint roots saved by the trainer at TP=1, TP=2 and PP=2, and the Megatron model's logits
    and greedy continuations for each. Everything runs at once (the reference process imports
    Megatron while the trainers run, then waits for their checkpoints): ~60 s on 2 cores."""
    roots = {name: work / name / "ckpt" for name in LAYOUTS}
    procs = {}
    for name, (overrides, nproc) in LAYOUTS.items():
        # torchrun directly (not `kumihimo train --nproc-per-node`) spares a launcher process.
        launcher = (
            [
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={nproc}",
                "--nnodes=1",
                "--standalone",
            ]
            if nproc > 1
            else []
        )
        procs[name] = _launch(
            [
                *launcher,
                "-m",
                "kumihimo.cli",
                "train",
                TINY,
                "model.num_layers=2",
                "model.rotary_base=50000",
                "schedule.train_iters=1",
                "schedule.lr_warmup_iters=0",
                "schedule.eval_interval=0",
                "data.mock=true",
                f"data.tokenizer={spm_model}",
                f"output_dir={work / name}",
                f"checkpoint.dir={roots[name]}",
                *overrides,
            ]
        )
    torch.save(prompt, work / "prompt.pt")
    procs["reference"] = _launch(
        [
            "-m",
            "tests.test_convert_to_hf",
            str(work / "prompt.pt"),
            str(work / "reference.pt"),
            *map(str, roots.values()),
        ]
    )
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
    return roots, dict(zip(roots, torch.load(work / "reference.pt")))


@pytest.fixture(scope="module")
def checkpoints(megatron) -> dict[str, Path]:
    return megatron[0]


@pytest.fixture(scope="module")
def reference(megatron) -> dict[str, dict[str, torch.Tensor]]:
    return megatron[1]


@pytest.fixture(scope="module")
def converted(checkpoints, work) -> dict[str, Path]:
    return {
        name: convert_to_hf(root, work / f"hf-{name}", dtype="fp32") for name, root in checkpoints.items()
    }


def load_hf(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def copy_checkpoint(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


# ------------------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_logits_and_greedy_generation_match_megatron(layout, converted, reference, prompt):
    model = load_hf(converted[layout])
    with torch.no_grad():
        logits = model(prompt).logits
    expected = reference[layout]["logits"]
    assert logits.shape == (*prompt.shape, VOCAB)
    # Megatron's padding columns are trimmed, so compare against the tokenizer's 1000 columns.
    assert (logits - expected[..., :VOCAB]).abs().max().item() < 1e-4
    generated = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=3
    )
    assert torch.equal(generated[:, prompt.shape[1] :], reference[layout]["generated"])


# ------------------------------------------------------------------------------------------ folder contents


def test_config_and_tokenizer_come_from_the_checkpoint(converted, spm_model):
    from transformers import AutoTokenizer

    from kumihimo.tokenizer.base import load_tokenizer

    folder = converted["tp2"]
    config = json.loads((folder / "config.json").read_text())
    tok = load_tokenizer(spm_model)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 192, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-5
    assert config["max_position_embeddings"] == 128 and config["vocab_size"] == VOCAB
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    assert config["kumihimo"]["iteration"] == 1 and config["kumihimo"]["megatron_padded_vocab_size"] == 1024
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 3 + 2 * 9 and set(index["weight_map"].values()) == {
        "model-00001-of-00001.safetensors"
    }
    hf_tok = AutoTokenizer.from_pretrained(folder)
    text = "日本の言語モデルを研究しています。The model reads data."
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_default_bf16_and_kept_vocab_padding(checkpoints, converted, work, monkeypatch):
    from safetensors import safe_open

    from kumihimo.pretrain.convert import to_hf

    monkeypatch.setattr(to_hf, "WRITE_BLOCK_ELEMENTS", 1000)  # many blocks per tensor, each cast on its own
    folder = convert_to_hf(checkpoints["tp1"], work / "hf-bf16-padded", keep_vocab_padding=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == 1024 and config["torch_dtype"] == "bfloat16"
    assert "padding" in config["kumihimo"]["vocab_padding_kept"]
    assert "vocabulary padding kept" in (folder / "README.md").read_text()
    with (
        safe_open(next(folder.glob("*.safetensors")), "pt") as padded,
        safe_open(next(converted["tp1"].glob("*.safetensors")), "pt") as fp32,
    ):
        embedding = padded.get_tensor("model.embed_tokens.weight")
        assert embedding.dtype == torch.bfloat16 and embedding.shape == (1024, 64)
        assert torch.equal(embedding[:VOCAB], fp32.get_tensor("model.embed_tokens.weight").to(torch.bfloat16))


def test_small_shards_load_the_same_model(checkpoints, converted, work, prompt):
    folder = convert_to_hf(checkpoints["pp2"], work / "hf-sharded", dtype="fp32", max_shard_bytes=100_000)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 5 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with torch.no_grad():
        assert torch.equal(load_hf(folder)(prompt).logits, load_hf(converted["pp2"])(prompt).logits)


def test_cli_to_hf(checkpoints, work, capsys):
    from kumihimo.cli import main

    out = work / "hf-cli"
    assert (
        main(
            [
                "convert",
                "to-hf",
                "--checkpoint",
                str(checkpoints["tp2"]),
                "--iteration",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "config.json").is_file() and "GB/s" in capsys.readouterr().err
    assert not list(work.glob(".hf-cli.tmp-*"))  # the staging folder was renamed, not left behind
    assert main(["convert", "to-hf", "--checkpoint", str(work / "nowhere"), "--output", str(work / "x")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("kumihimo: error: checkpoint folder")


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_problem(checkpoints, work, spm_model):
    root = copy_checkpoint(checkpoints["tp1"], work / "broken")
    with pytest.raises(UserError, match="iteration 7 is not in"):
        convert_to_hf(root, work / "x1", iteration=7)
    with pytest.raises(UserError, match="already exists"):
        (work / "taken").mkdir()
        (work / "taken" / "file").write_text("x")
        convert_to_hf(root, work / "taken")
    other = train_spm(work / "other-tok", seed=2)
    with pytest.raises(UserError, match="tokenizer mismatch"):
        convert_to_hf(root, work / "x2", tokenizer=other)
    iteration = root / "iter_0000001"
    next(iteration.glob("*.distcp")).unlink()
    with pytest.raises(UserError, match="incomplete"):
        convert_to_hf(root, work / "x3")
    assert not (work / "x3").exists() and not list(work.glob(".x3.tmp-*"))
    (iteration / "run_config.yaml").unlink()
    with pytest.raises(UserError, match="run_config.yaml"):
        convert_to_hf(root, work / "x4")
    (iteration / "kumihimo.json").unlink()
    with pytest.raises(UserError, match="kumihimo.json"):
        convert_to_hf(root, work / "x5")
    (root / "latest_checkpointed_iteration.txt").unlink()
    with pytest.raises(UserError, match="no complete checkpoint"):
        convert_to_hf(root, work / "x6")


def test_architecture_checks(checkpoints):
    source = open_checkpoint(checkpoints["tp1"])
    dims = dims_for(source, keep_vocab_padding=False)
    reader = source.reader
    check_architecture(reader, dims)
    wrong_groups = mapping.LlamaDims(**{**dims.__dict__, "num_query_groups": 4})
    with pytest.raises(UserError, match="linear_qkv.weight has shape"):
        check_architecture(reader, wrong_groups)
    reader.tensors["decoder.layers.self_attention.linear_qkv.bias"] = reader.tensors[
        "decoder.final_layernorm.weight"
    ]
    with pytest.raises(UserError, match="unsupported architecture"):
        check_architecture(reader, dims)
    del reader.tensors["decoder.layers.self_attention.linear_qkv.bias"]
    del reader.tensors["output_layer.weight"]
    with pytest.raises(UserError, match="lacks tensor output_layer.weight"):
        check_architecture(reader, dims)


# ------------------------------------------------------------------------------------------ mapping


def test_qkv_split_is_per_group_and_invertible():
    dims = mapping.LlamaDims(
        num_layers=1,
        hidden_size=8,
        ffn_hidden_size=12,
        num_attention_heads=6,
        num_query_groups=2,
        head_dim=4,
        megatron_vocab_size=16,
        hf_vocab_size=10,
    )
    rows = (6 + 2 * 2) * 4
    fused = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, 8).contiguous()
    qkv = mapping.TRANSFORMS["qkv_per_group"]
    query, key, value = qkv.to_hf(fused, dims)
    # Group 0 holds rows 0-11 (3 query heads), 12-15 (key), 16-19 (value); group 1 follows.
    assert query[:, 0].tolist() == list(range(0, 12)) + list(range(20, 32))
    assert key[:, 0].tolist() == list(range(12, 16)) + list(range(32, 36))
    assert value[:, 0].tolist() == list(range(16, 20)) + list(range(36, 40))
    assert torch.equal(qkv.from_hf([query, key, value], dims), fused)
    for name in ("gate_up", "vocab_rows", "identity"):
        transform = mapping.TRANSFORMS[name]
        tensor = torch.randn(16, 8) if name == "vocab_rows" else torch.randn(24, 8)
        parts = transform.to_hf(tensor, dims)
        restored = transform.from_hf(parts, dims)
        if name == "vocab_rows":
            assert parts[0].shape == (10, 8) and torch.equal(restored[:10], tensor[:10])
        else:
            assert torch.equal(restored, tensor)


def test_shard_plan():
    tensors = [PlannedTensor(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 50, 5, 5])]
    shards = plan_shards(tensors, max_shard_bytes=80)
    assert [[t.name for t in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_reader_reads_layer_slices(checkpoints):
    reader = TorchDistReader(checkpoints["tp2"] / "iter_0000001")
    key = "decoder.layers.mlp.linear_fc1.weight"
    full = reader.read({"all": (key, None)})["all"]
    layer = reader.read({"one": (key, 1)})["one"]
    assert full.shape == (2, 384, 64) and torch.equal(layer, full[1])


# ------------------------------------------------------------------------------------------ reference


def _megatron_reference(prompt_path: str, out_path: str, roots: list[str]) -> None:
    """Build GPTModel at TP=1/PP=1 (world size 1, gloo), load each checkpoint, record logits and a
    greedy continuation (full recompute per token, no cache)."""
    import torch.distributed as dist

    from kumihimo.pretrain import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kumihimo.core import configtree
    from kumihimo.pretrain.checkpoint_format import SHARDING_METADATA, read_meta
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.parallel import ParallelLayout
    from tests.conftest import build_run_model

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    prompt = torch.load(prompt_path)
    results = []
    for root in map(Path, roots):
        folder = _wait_for_checkpoint(root)
        data = configtree.read_yaml(folder / "run_config.yaml")
        data["parallelism"] = {}
        data.setdefault("runtime", {})["device"] = "cpu"  # from-hf checkpoints record the default, cuda
        config = configtree.from_dict(TrainConfig, data)
        meta = read_meta(folder)
        (model,) = build_run_model(config, ParallelLayout.from_config(config, 1), meta["padded_vocab_size"])
        sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
        loaded = dist_checkpointing.load(sharded, str(folder))  # also returns the common (non-model) state
        model.load_state_dict({key: value for key, value in loaded.items() if key in sharded})
        model.eval()

        def forward(tokens, model=model):
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            return model(tokens, positions, None)

        with torch.no_grad():
            logits = forward(prompt)
            tokens = prompt
            for _ in range(NEW_TOKENS):
                next_token = forward(tokens)[:, -1, : meta["vocab_size"]].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, next_token], dim=1)
        results.append({"logits": logits, "generated": tokens[:, prompt.shape[1] :]})
    torch.save(results, out_path)


def _wait_for_checkpoint(root: Path, timeout: float = 300) -> Path:
    import time

    from kumihimo.pretrain.checkpoint_format import iteration_dir, read_latest

    deadline = time.monotonic() + timeout
    while (latest := read_latest(root)) is None:  # the marker is written last, atomically
        assert time.monotonic() < deadline, f"no checkpoint appeared in {root}"
        time.sleep(0.5)
    return iteration_dir(root, latest)


if __name__ == "__main__":
    _megatron_reference(sys.argv[1], sys.argv[2], sys.argv[3:])

"""`kumihimo convert from-hf`: HF -> Megatron -> HF is bit-identical, and the trainer starts from it.

Random LlamaForCausalLM models (GQA 4 heads / 2 groups, every weight random including the norms, a
1000-piece SentencePiece tokenizer) are converted in one subprocess (conversion owns
torch.distributed while it runs). Then, at the same time: the Megatron model (TP=1) computes
logits from the fp32 checkpoint, and the trainer at TP=2 (torchrun, 2 processes) loads its weights
through `checkpoint.pretrained` (weights only), saves a full checkpoint before any step, and trains one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kumihimo.errors import UserError
from pretrain.convert.from_hf import HFModel, HFTensors, check_supported, convert_from_hf, read_hf_model
from pretrain.convert.to_hf import convert_to_hf
from pretrain.distributed import free_port
from tests.test_convert_to_hf import VOCAB, _launch, load_hf, train_spm

HF_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128,
                 rope_theta=50000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
# name -> (dtype, tied embeddings, --tp, --pp)
MODELS = {"fp32": (torch.float32, False, 2, 1), "bf16": (torch.bfloat16, False, 1, 2),
          "tied": (torch.float32, True, 1, 1)}


def make_hf_model(folder: Path, dtype: torch.dtype, tied: bool, spm_model: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG, tie_word_embeddings=tied))
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
    return {name: make_hf_model(work / f"hf-{name}", dtype, tied, spm_model)
            for name, (dtype, tied, _tp, _pp) in MODELS.items()}


@pytest.fixture(scope="module")
def converted(hf_models, work) -> dict[str, Path]:
    """Checkpoint roots from `kumihimo convert from-hf` (one process; the first by the CLI)."""
    roots = {name: work / f"ckpt-{name}" for name in MODELS}
    calls = [f"convert_from_hf({str(hf_models[n])!r}, {str(roots[n])!r}, tp={tp}, pp={pp})"
             for n, (_dtype, _tied, tp, pp) in MODELS.items()]
    code = ("import sys\nfrom kumihimo.cli import main\nfrom pretrain.convert.from_hf import convert_from_hf\n"
            f"assert main(['convert', 'from-hf', '--model', {str(hf_models['fp32'])!r}, '--output', "
            f"{str(roots['fp32'])!r}, '--tp', '2']) == 0\n" + "\n".join(calls[1:]))
    proc = _launch(["-c", code])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return roots


@pytest.fixture(scope="module")
def megatron(converted, work):
    """(Megatron TP=1 logits for the fp32 checkpoint, the trainer's TP=2 run dir), run concurrently."""
    prompt = torch.randint(4, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.save(prompt, work / "prompt.pt")
    run_dir = work / "continued"
    procs = {
        "reference": _launch(["-m", "tests.test_convert_to_hf", str(work / "prompt.pt"), str(work / "ref.pt"),
                              str(converted["fp32"])]),
        "trainer": _launch(["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
                            f"--master-port={free_port()}", "-m", "tests.test_convert_from_hf",
                            str(converted["fp32"]), str(run_dir)]),
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} failed:\n{out[-3000:]}"
    (reference,) = torch.load(work / "ref.pt")
    return prompt, reference, run_dir


# ------------------------------------------------------------------------------------------ round trip


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_megatron_hf_round_trip_is_bit_identical(name, hf_models, converted, work):
    dtype, tied, tp, _pp = MODELS[name]
    back = convert_to_hf(converted[name], work / f"back-{name}", dtype="fp32" if dtype == torch.float32 else "bf16")
    original, restored = hf_weights(hf_models[name]), hf_weights(back)
    if tied:  # the kumihimo model has its own output layer, which starts as the embedding
        original["lm_head.weight"] = original["model.embed_tokens.weight"]
    assert original.keys() == restored.keys()
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    source, config = (json.loads((folder / "config.json").read_text()) for folder in (hf_models[name], back))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == source[key], key
    assert config["rope_parameters"]["rope_theta"] == source["rope_parameters"]["rope_theta"]


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
    assert config["precision"]["params_dtype"] == "fp32" and config["data"]["tokenizer"] == meta["tokenizer"]["path"]
    bf16 = yaml.safe_load((converted["bf16"] / "iter_0000000" / "run_config.yaml").read_text())
    assert bf16["precision"]["params_dtype"] == "bf16" and bf16["parallelism"]["pipeline_model_parallel_size"] == 2


# ------------------------------------------------------------------------------------------ Megatron side


def test_megatron_logits_match_hf(hf_models, megatron):
    prompt, reference, _run_dir = megatron
    with torch.no_grad():
        logits = load_hf(hf_models["fp32"])(prompt).logits
    assert (reference["logits"][..., :VOCAB] - logits).abs().max().item() < 1e-4


def test_trainer_at_tp2_starts_from_the_weights(hf_models, megatron, work):
    """The trainer's TP=2 model holds exactly the HF weights (saved before any step, converted back
    bit-identically) and trains on from them (step 1 saved, finite loss)."""
    _prompt, _reference, run_dir = megatron
    back = convert_to_hf(run_dir / "ckpt", work / "continued-hf", iteration=0, dtype="fp32")
    original, restored = hf_weights(hf_models["fp32"]), hf_weights(back)
    assert all(torch.equal(restored[key], tensor) for key, tensor in original.items())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 1 and 0 < metrics[-1]["loss"] < 20
    assert (run_dir / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


# ------------------------------------------------------------------------------------------ errors


def test_unsupported_models_are_refused(hf_models, work):
    with pytest.raises(UserError, match="no config.json"):
        read_hf_model(work)
    base = json.loads((hf_models["fp32"] / "config.json").read_text())
    for change, message in (({"model_type": "mistral"}, "model_type='mistral'"),
                            ({"attention_bias": True}, "attention_bias"),
                            ({"hidden_act": "gelu"}, "hidden_act"),
                            ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_scaling")):
        with pytest.raises(UserError, match=message):
            check_supported({**base, **change})
    empty = work / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(base))
    with pytest.raises(UserError, match="no safetensors weights"):
        convert_from_hf(empty, work / "out")
    with pytest.raises(UserError, match="already exists"):
        convert_from_hf(hf_models["fp32"], hf_models["bf16"])


def test_unknown_tensors_are_refused(hf_models):
    model = read_hf_model(hf_models["fp32"])
    extra = HFModel(model.folder, model.config, {**model.weight_files,
                                                  "model.layers.0.self_attn.q_proj.bias": model.folder})
    tensors = HFTensors(extra)
    tensors.used = set(model.weight_files)
    with pytest.raises(UserError, match="unsupported architecture: model.layers.0.self_attn.q_proj.bias"):
        tensors.check_all_used()
    with pytest.raises(UserError, match="has shape"):
        HFTensors(model).get("model.norm.weight", (32,))


# ------------------------------------------------------------------------------------------ trainer run


def _continue_pretraining(root: str, run_dir: str) -> None:
    """In every torchrun process: the trainer at the checkpoint's TP=2 layout starts from it through
    `checkpoint.pretrained` (weights only), saves at step 0, then trains one step."""
    from kumihimo import configtree
    from pretrain.checkpointing import find_checkpoint
    from pretrain.config import TrainConfig
    from pretrain.distributed import destroy
    from pretrain.training import Trainer

    folder = find_checkpoint(Path(root))
    config = configtree.load(TrainConfig, folder / "run_config.yaml", [
        "data.mock=true", "runtime.device=cpu", f"runtime.run_dir={run_dir}", f"checkpoint.save={run_dir}/ckpt",
        f"checkpoint.pretrained={root}", "schedule.train_iters=1", "schedule.lr_warmup_iters=0",
        "schedule.global_batch_size=2", "schedule.micro_batch_size=1", "schedule.eval_interval=0"])
    trainer = Trainer(config)
    try:
        trainer.setup()
        assert trainer.state.iteration == 0
        trainer.save(Path(run_dir) / "ckpt")
        trainer.train()
    finally:
        destroy()


if __name__ == "__main__":
    _continue_pretraining(sys.argv[1], sys.argv[2])

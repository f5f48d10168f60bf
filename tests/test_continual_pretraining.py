"""Continual pretraining end to end, through the CLI, from a Hugging Face folder back to one.

A tiny random Qwen2 model (QKV biases, untied head) is saved together with a byte-level BPE tokenizer
trained here with the `tokenizers` library (no tokenizer.model: a Hugging Face tokenizer), and its
config.json vocab_size is larger than the trainer's padded vocabulary (len(tokenizer) padded to 128),
as Qwen2.5's 151,936 rows are for its 151,665 tokens. Then, as a user runs it:

    kumihimo convert from-hf --model HF --output CKPT
    kumihimo data tokenize DATA.yaml --tokenizer CKPT/tokenizer
    kumihimo train CKPT/iter_0000000/run_config.yaml checkpoint.pretrained=CKPT data.tokenizer=CKPT/tokenizer ...
    kumihimo convert to-hf RUN_CKPT --output HF_OUT
    kumihimo eval RUN_CKPT / HF_OUT

Checked: the checkpoint records the Hugging Face tokenizer (kind, the sha256 the trainer computes) and
the padded vocabulary the trainer computes, so the trainer accepts it; exporting the imported checkpoint
gives the original tensors bit for bit (all config.json rows) and a tokenizer that loads offline with the
same ids; after three training steps the exported model's per-choice log-likelihoods equal the Megatron
checkpoint's within 1e-4 (`kumihimo eval` on the checkpoint and the in-loop evaluation of the last
step; kumihimo's Hugging Face scorer on the export: all normalised over config.json's rows), all
config.json rows come back, its weights moved, and generate runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kumihimo.core.errors import UserError
from kumihimo.pretrain.parallel import padded_vocab_size
from tests.conftest import run_cli
from tests.eval_tasks import write_tasks
from tests.test_data_prep_hf_tokenizer import LINES, make_hf_tokenizer

TOLERANCE = 1e-4


def make_hf_folder(folder: Path) -> tuple[Path, int]:
    """A Qwen2 model and its tokenizer in one folder; returns it and len(tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    make_hf_tokenizer(folder, with_bos=False)  # Qwen-like: no BOS; eos </s>
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = len(tokenizer)
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=padded_vocab_size(vocab, 128, 1) + 8,  # more rows than the trainer pads the tokenizer to
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm = param.dim() == 1 and "norm" in name
            param.normal_(1.0 if is_norm else 0.0, 0.1 if param.dim() == 1 else 0.05)
    model.save_pretrained(folder)
    return folder, vocab


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def write_data_config(root: Path) -> Path:
    """A data_prep recipe whose curated JSONL is already there (the tokenize stage reads only that)."""
    curated = root / "out" / "curated"
    curated.mkdir(parents=True)
    docs = [f"{line} {LINES[(i + 1) % len(LINES)]}" for i in range(60) for line in LINES[i % 3 :: 3]]
    (curated / "ja.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}, ensure_ascii=False) + "\n" for i, t in enumerate(docs)),
        encoding="utf-8",
    )
    config = root / "data.yaml"
    config.write_text(
        f"output_dir: {root / 'out'}\nnum_workers: 1\n"
        f"input:\n  sources:\n    - name: ja\n      paths: [{root / 'unused.jsonl'}]\n",
        encoding="utf-8",
    )
    return config


def ok(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def samples(folder: Path) -> dict[str, list[dict]]:
    return {
        path.stem.removeprefix("samples_"): [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(folder.rglob("samples_*.jsonl"))
    }


@pytest.mark.slow  # five CLI runs (convert, tokenize, train, convert, two evaluations)
def test_hf_folder_to_continued_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kumihimo.pretrain.evaluate.hf_backend import HFBackend
    from kumihimo.pretrain.evaluate.runner import run_tasks
    from kumihimo.pretrain.evaluate.tasks import load_tasks
    from kumihimo.tokenizer.hf import HFTokenizer

    hf, vocab = make_hf_folder(tmp_path / "hf")
    hf_rows = json.loads((hf / "config.json").read_text())["vocab_size"]
    original = weights(hf)

    # Import: the Hugging Face tokenizer travels with the weights, recorded as the trainer records it.
    ckpt = tmp_path / "ckpt"
    out = ok(run_cli("convert", "from-hf", "--model", str(hf), "--output", str(ckpt)))
    assert "make_vocab_size_divisible_by=" in out
    iter0 = ckpt / "iter_0000000"
    meta = json.loads((iter0 / "kumihimo.json").read_text())
    run_config = (iter0 / "run_config.yaml").read_text()
    divisible_by = int(run_config.split("make_vocab_size_divisible_by:")[1].split()[0])
    assert divisible_by > 128
    assert meta["vocab_size"] == vocab
    assert meta["padded_vocab_size"] == padded_vocab_size(vocab, divisible_by, 1) >= hf_rows
    assert meta["tokenizer"]["kind"] == "huggingface"
    assert meta["tokenizer"]["sha256"] == HFTokenizer(hf).sha256 == HFTokenizer(ckpt / "tokenizer").sha256
    assert meta["tokenizer"]["path"] == str((ckpt / "tokenizer").resolve())
    assert not (ckpt / "tokenizer" / "model.safetensors").exists()

    # Step 0: exporting the import gives the original model back bit for bit, and its tokenizer.
    back0 = tmp_path / "hf-back0"
    ok(run_cli("convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(back0), "--dtype", "fp32"))
    restored = weights(back0)
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], v) for k, v in original.items())
    assert json.loads((back0 / "config.json").read_text())["vocab_size"] == hf_rows
    reference = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    exported = AutoTokenizer.from_pretrained(back0, local_files_only=True)
    text = LINES[2] + " " + LINES[5]
    assert exported(text).input_ids == reference(text).input_ids
    assert exported.eos_token_id == reference.eos_token_id and len(exported) == vocab

    # Tokenize with the checkpoint's tokenizer folder, then continue pretraining from the import.
    data = write_data_config(tmp_path / "data")
    ok(run_cli("data", "tokenize", str(data), "--tokenizer", str(ckpt / "tokenizer")))
    tasks = tmp_path / "tasks"
    task_files = write_tasks(tasks)
    run, run_ckpt = tmp_path / "run", tmp_path / "run-ckpt"
    settings = [
        "runtime.device=cpu",
        f"data.blend_file={tmp_path / 'data' / 'out' / 'blend.yaml'}",
        f"data.tokenizer={ckpt / 'tokenizer'}",
        f"checkpoint.pretrained={ckpt}",
        "model.seq_length=64",
        "schedule.train_iters=3",
        "schedule.lr_warmup_iters=0",
        "schedule.micro_batch_size=2",
        "schedule.global_batch_size=4",
        "schedule.eval_interval=0",
        f"evaluation.tasks=[{tasks}]",
        "evaluation.interval=3",
        "optimizer.lr=3e-3",
        "logging.log_interval=1",
    ]
    # A recipe's usual 128 would pad to fewer rows than the import has: refused, naming the value to set.
    refused = run_cli(
        "train",
        str(iter0 / "run_config.yaml"),
        *settings,
        f"output_dir={tmp_path / 'refused'}",
        "model.make_vocab_size_divisible_by=128",
    )
    assert refused.returncode != 0
    assert f"set model.make_vocab_size_divisible_by={divisible_by}" in refused.stdout + refused.stderr
    # `--check` says the same before anything is built; with the import's value it passes.
    check = [*settings, f"output_dir={tmp_path / 'refused'}", "--check"]
    refused = run_cli(
        "train", str(iter0 / "run_config.yaml"), *check, "model.make_vocab_size_divisible_by=128"
    )
    assert refused.returncode == 2
    assert f"set model.make_vocab_size_divisible_by={divisible_by}" in refused.stderr
    assert "config OK" in ok(run_cli("train", str(iter0 / "run_config.yaml"), *check))
    train = run_cli(
        "train",
        str(iter0 / "run_config.yaml"),
        *settings,
        f"output_dir={run}",
        f"checkpoint.dir={run_ckpt}",
        timeout=600,
    )
    assert "initialised weights from" in ok(train)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in losses if "loss" in m][-1] == 3

    # Export the trained checkpoint; it loads offline, its weights moved, and it scores as Megatron does.
    hf_out = tmp_path / "hf-out"
    ok(run_cli("convert", "to-hf", "--checkpoint", str(run_ckpt), "--output", str(hf_out), "--dtype", "fp32"))
    trained = weights(hf_out)
    assert trained.keys() == original.keys()
    assert not torch.equal(
        trained["model.layers.0.self_attn.q_proj.bias"], original["model.layers.0.self_attn.q_proj.bias"]
    )
    # All of config.json's rows come back: the trained checkpoint carries the import's record of them.
    trained_meta = json.loads(next(run_ckpt.glob("iter_*/kumihimo.json")).read_text())
    assert trained_meta["source"]["hf_vocab_size"] == hf_rows and not trained_meta.get("weights_only")
    assert trained["lm_head.weight"].shape[0] == hf_rows
    assert json.loads((hf_out / "config.json").read_text())["vocab_size"] == hf_rows

    # Per-choice log-likelihoods of the Megatron checkpoint (`kumihimo eval`) and of the in-loop evaluation
    # at the last step equal transformers' on the export: all normalised over config.json's rows.
    megatron_eval = tmp_path / "eval-megatron"
    ok(
        run_cli(
            "eval", str(run_ckpt), "--tasks", str(tasks), "--output", str(megatron_eval), "--device", "cpu"
        )
    )
    backend = HFBackend(hf_out, device="cpu")
    assert backend.vocab_size == hf_rows
    theirs = {
        r.name: r.samples for r in run_tasks(load_tasks(task_files), backend, backend.codec, batch_size=4)
    }
    for ours in (samples(megatron_eval), samples(run / "eval" / "iter_0000003")):
        assert ours.keys() == theirs.keys() and ours
        compared = 0
        for task, rows in ours.items():
            for x, y in zip(rows, theirs[task], strict=True):
                if "loglikelihoods" in x:
                    diffs = [
                        abs(p - q) for p, q in zip(x["loglikelihoods"], y["loglikelihoods"], strict=True)
                    ]
                    assert max(diffs) < TOLERANCE, (task, x, y)
                    compared += len(diffs)
                else:
                    assert x.get("generation") == y.get("generation"), (task, x, y)
        assert compared > 10

    model = AutoModelForCausalLM.from_pretrained(hf_out, local_files_only=True, dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    prompt = exported(LINES[0], return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt.input_ids.shape[1] + 5 or generated[0, -1] == exported.eos_token_id


# ---------------------------------------------------------------------------------------------
# The vocabulary rows of an imported model, on their own
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "rows", "tp", "expected"),
    [
        (151_665, 151_936, 1, (151_665, 152_064, 512)),  # Qwen2.5: 151,680 and 151,808 are too few
        (151_665, 151_936, 2, (151_665, 152_064, 256)),  # 128 x TP=2 pads to 151,808: doubled once
        (128_256, 128_256, 1, (128_256, 128_256, 128)),  # Llama 3: rows = tokens, nothing changes
        (32_000, 32_000, 4, (32_000, 32_256, 128)),  # Llama 2 at TP=4: padding beyond the rows is fine
    ],
)
def test_vocab_sizes_doubles_divisible_by_until_the_rows_fit(tokens, rows, tp, expected, capsys):
    from kumihimo.pretrain.convert.from_hf import vocab_sizes

    hf = SimpleNamespace(config={"vocab_size": rows})
    vocab, padded, divisible_by = vocab_sizes(hf, SimpleNamespace(vocab_size=tokens), tp, 128)
    assert (vocab, padded, divisible_by) == expected
    assert padded == padded_vocab_size(tokens, divisible_by, tp) >= rows
    said = capsys.readouterr().err
    assert (f"make_vocab_size_divisible_by={divisible_by}" in said) == (divisible_by != 128)


def test_vocab_sizes_refuses_a_tokenizer_larger_than_the_model():
    from kumihimo.core.errors import UserError
    from kumihimo.pretrain.convert.from_hf import vocab_sizes

    hf = SimpleNamespace(config={"vocab_size": 32_000})
    with pytest.raises(
        UserError, match=r"the tokenizer has 32005 tokens but config.json vocab_size is 32000"
    ):
        vocab_sizes(hf, SimpleNamespace(vocab_size=32_005), 1, 128)


def save_checkpoint(root: Path, iteration: int, meta: dict, **settings) -> None:
    """A checkpoint folder as far as imported_vocab_rows reads it: kumihimo.json, run_config.yaml, latest."""
    from kumihimo.core import configtree
    from kumihimo.pretrain import checkpoint_format
    from kumihimo.pretrain.config import TrainConfig

    config = TrainConfig()
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    folder = checkpoint_format.iteration_dir(root, iteration)
    folder.mkdir(parents=True)
    configtree.save(config, folder / checkpoint_format.CONFIG_FILE)
    (folder / checkpoint_format.META_FILE).write_text(json.dumps(meta))
    (root / checkpoint_format.LATEST_FILE).write_text(f"{iteration}\n")


def read_back(root: Path, iteration: int):
    from kumihimo.pretrain import checkpoint_format

    folder = checkpoint_format.iteration_dir(root, iteration)
    return checkpoint_format.read_meta(folder), checkpoint_format.read_run_config(folder)


def test_imported_vocab_rows_follow_pretrained_and_branch_sources(tmp_path, capsys):
    """import (151,936 rows) -> a run from it (checkpoint.pretrained) -> a branch of that run at its step 10
    (whose later saves went on) -> the branch's own save: each exports the import's rows."""
    from kumihimo.pretrain.checkpoint_format import imported_vocab_rows, source_vocab_rows

    qwen = {"vocab_size": 151_665, "padded_vocab_size": 152_064}
    imported, trunk, branch = tmp_path / "import", tmp_path / "trunk", tmp_path / "branch"
    save_checkpoint(imported, 0, {**qwen, "weights_only": True, "source": {"hf_vocab_size": 151_936}})
    save_checkpoint(trunk, 10, qwen, checkpoint__pretrained=str(imported))
    save_checkpoint(trunk, 20, qwen, checkpoint__pretrained=str(imported))
    save_checkpoint(branch, 5, qwen, branch__source=str(trunk), branch__iteration=10)

    for root, iteration in ((imported, 0), (trunk, 20), (branch, 5)):
        meta, config = read_back(root, iteration)
        assert imported_vocab_rows(meta, config) == 151_936
        assert source_vocab_rows(meta, config) == 151_936

    # The trunk's step 10 rotated away: its latest save names the same import.
    (trunk / "iter_0000010" / "kumihimo.json").unlink()
    (trunk / "iter_0000010" / "run_config.yaml").unlink()
    (trunk / "iter_0000010").rmdir()
    assert imported_vocab_rows(*read_back(branch, 5)) == 151_936

    # The import deleted: the tokenizer's rows only, with a note that says why.
    for name in ("kumihimo.json", "run_config.yaml"):
        (imported / "iter_0000000" / name).unlink()
    capsys.readouterr()
    meta, config = read_back(branch, 5)
    assert imported_vocab_rows(meta, config) is None
    assert source_vocab_rows(meta, config) == 151_665
    assert "cannot be read" in capsys.readouterr().err


def test_imported_vocab_rows_stop_at_another_padded_vocabulary(tmp_path):
    """A run that pads its vocabulary otherwise than the import (a new tokenizer) does not take its rows."""
    from kumihimo.pretrain.checkpoint_format import imported_vocab_rows, source_vocab_rows

    imported, run = tmp_path / "import", tmp_path / "run"
    save_checkpoint(
        imported,
        0,
        {"vocab_size": 151_665, "padded_vocab_size": 152_064, "source": {"hf_vocab_size": 151_936}},
    )
    save_checkpoint(
        run, 3, {"vocab_size": 151_665, "padded_vocab_size": 151_680}, checkpoint__pretrained=str(imported)
    )
    meta, config = read_back(run, 3)
    assert imported_vocab_rows(meta, config) is None
    assert source_vocab_rows(meta, config) == 151_665


def pretrained_run(divisible_by: int) -> SimpleNamespace:
    return SimpleNamespace(
        checkpoint=SimpleNamespace(pretrained="/ckpt/qwen"),
        data=SimpleNamespace(tokenizer="/data/tok"),
        model=SimpleNamespace(make_vocab_size_divisible_by=divisible_by),
    )


QWEN_IMPORT = {
    "vocab_size": 151_665,
    "padded_vocab_size": 152_064,
    "tokenizer": {"kind": "huggingface", "path": "/ckpt/qwen/tokenizer", "sha256": "a" * 64},
}


@pytest.mark.parametrize(
    ("vocab", "tp", "fix"),
    [
        (151_665, 1, "set model.make_vocab_size_divisible_by=512"),
        (151_665, 2, "set model.make_vocab_size_divisible_by=256"),
        (151_665, 5, "convert it again with --tp 5"),  # no power of two x 5 pads to 152,064
        (151_643, 1, "set data.tokenizer=/ckpt/qwen/tokenizer"),  # another tokenizer
    ],
)
def test_pretrained_with_another_padded_vocabulary_is_refused_with_the_fix(vocab, tp, fix):
    from kumihimo.core.configtree import ConfigError
    from kumihimo.pretrain import integrity

    padded = padded_vocab_size(vocab, 128, tp)
    with pytest.raises(ConfigError) as caught:
        integrity.check_pretrained(
            QWEN_IMPORT, Path("/ckpt/qwen/iter_0000000"), pretrained_run(128), None, vocab, padded, tp
        )
    message = str(caught.value)
    assert "151665 tokens padded to 152064 embedding rows" in message
    assert f"this run has {vocab} (data.tokenizer=/data/tok) padded to {padded}" in message
    assert message.endswith(fix) or fix + " " in message
    if "divisible_by=" in fix:  # the value named gives the checkpoint's rows
        assert padded_vocab_size(vocab, int(fix.rsplit("=", 1)[1]), tp) == 152_064


def test_pretrained_tokenizer_identity_is_compared():
    from kumihimo.pretrain import integrity

    args = (Path("/ckpt/qwen/iter_0000000"), pretrained_run(512))
    same = {"kind": "huggingface", "sha256": "a" * 64}
    assert integrity.check_pretrained(QWEN_IMPORT, *args, same, 151_665, 152_064, 1) == []
    assert integrity.check_pretrained(QWEN_IMPORT, *args, None, 151_665, 152_064, 1) == []  # mock data
    (note,) = integrity.check_pretrained(QWEN_IMPORT, *args, {"sha256": "b" * 64}, 151_665, 152_064, 1)
    assert note.startswith("warning:") and "aaaaaaaaaaaa" in note and "bbbbbbbbbbbb" in note


def test_hf_tokenizer_copy_takes_the_identity_files_and_chat_template_not_weights(tmp_path):
    from kumihimo.pretrain.convert.dcp_files import copy_hf_tokenizer
    from kumihimo.tokenizer.hf import HFTokenizer

    source = make_hf_tokenizer(tmp_path / "model", with_bos=False)
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (source / "model.safetensors").write_bytes(b"\0" * 64)
    copied = copy_hf_tokenizer(source, tmp_path / "copy", extra=("config.json",))
    assert "chat_template.jinja" in copied and "tokenizer.json" in copied
    assert not (tmp_path / "copy" / "model.safetensors").exists()
    assert HFTokenizer(tmp_path / "copy").sha256 == HFTokenizer(source).sha256
    with pytest.raises(UserError, match="has no tokenizer.json"):
        copy_hf_tokenizer(tmp_path / "copy" / "nothing", tmp_path / "again")


@pytest.mark.slow  # four CLI runs (convert, tokenize, train, convert) and one evaluation
def test_qwen3_moe_folder_to_continued_hf_folder(tmp_path):
    """The same path for a mixture of experts: a tiny Qwen3-MoE folder (4 experts, top-2) is imported,
    exported back bit for bit, trained two steps (router aux loss on), exported as Qwen3MoeForCausalLM,
    and scores as the Megatron checkpoint does (`kumihimo eval`, 1e-4)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from kumihimo.pretrain.evaluate.hf_backend import HFBackend
    from kumihimo.pretrain.evaluate.runner import run_tasks
    from kumihimo.pretrain.evaluate.tasks import load_tasks

    hf = tmp_path / "hf"
    make_hf_tokenizer(hf, with_bos=False)
    tokenizer = AutoTokenizer.from_pretrained(hf, local_files_only=True)
    config = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=padded_vocab_size(len(tokenizer), 128, 1),
        max_position_embeddings=128,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(
                1.0 if param.dim() == 1 and "norm" in name else 0.0,
                0.3 if name.endswith("gate.weight") else 0.05,
            )
    model.save_pretrained(hf)
    original = weights(hf)

    ckpt = tmp_path / "ckpt"
    ok(run_cli("convert", "from-hf", "--model", str(hf), "--output", str(ckpt)))
    back0 = tmp_path / "hf-back0"
    ok(run_cli("convert", "to-hf", "--checkpoint", str(ckpt), "--output", str(back0), "--dtype", "fp32"))
    assert all(torch.equal(weights(back0)[k], v) for k, v in original.items())

    data = write_data_config(tmp_path / "data")
    ok(run_cli("data", "tokenize", str(data), "--tokenizer", str(ckpt / "tokenizer")))
    tasks = tmp_path / "tasks"
    task_files = write_tasks(tasks)
    run, run_ckpt = tmp_path / "run", tmp_path / "run-ckpt"
    iter0 = ckpt / "iter_0000000"
    ok(
        run_cli(
            "train",
            str(iter0 / "run_config.yaml"),
            "runtime.device=cpu",
            f"data.blend_file={tmp_path / 'data' / 'out' / 'blend.yaml'}",
            f"data.tokenizer={ckpt / 'tokenizer'}",
            f"checkpoint.pretrained={ckpt}",
            "model.seq_length=64",
            "model.moe.aux_loss_coeff=0.01",
            "schedule.train_iters=2",
            "schedule.lr_warmup_iters=0",
            "schedule.micro_batch_size=2",
            "schedule.global_batch_size=2",
            "schedule.eval_interval=0",
            "optimizer.lr=3e-3",
            f"output_dir={run}",
            f"checkpoint.dir={run_ckpt}",
            timeout=600,
        )
    )
    hf_out = tmp_path / "hf-out"
    ok(run_cli("convert", "to-hf", "--checkpoint", str(run_ckpt), "--output", str(hf_out), "--dtype", "fp32"))
    trained = weights(hf_out)
    assert trained.keys() == original.keys()
    expert = "model.layers.0.mlp.experts.0.up_proj.weight"
    assert not torch.equal(trained[expert], original[expert])  # the experts trained
    assert json.loads((hf_out / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]

    megatron_eval = tmp_path / "eval-megatron"
    ok(
        run_cli(
            "eval", str(run_ckpt), "--tasks", str(tasks), "--output", str(megatron_eval), "--device", "cpu"
        )
    )
    backend = HFBackend(hf_out, device="cpu")
    theirs = {
        r.name: r.samples for r in run_tasks(load_tasks(task_files), backend, backend.codec, batch_size=4)
    }
    ours = samples(megatron_eval)
    assert ours.keys() == theirs.keys() and ours
    compared = 0
    for task, rows in ours.items():
        for x, y in zip(rows, theirs[task], strict=True):
            if "loglikelihoods" in x:
                diffs = [abs(p - q) for p, q in zip(x["loglikelihoods"], y["loglikelihoods"], strict=True)]
                assert max(diffs) < TOLERANCE, (task, x, y)
                compared += len(diffs)
    assert compared > 10

"""`kumihimo convert average`: the streamed average equals an in-memory average, bit for bit.

Sources are weights-only checkpoints from `convert from-hf` of tiny random Llama models (seeds 0-2,
every weight random; fp32 and bf16) sharing a 1000-piece SentencePiece tokenizer. The reference
loads every checkpoint whole with torch.distributed.checkpoint's own reader (`dcp_to_torch_save`, no
kumihimo code) and applies the documented formula, in the same order, to the full tensors: the output
must equal it bit for bit (same float32 operations in the same order), and lie within one float32
ulp of torch.stack(...).mean(0). The averaged checkpoint has from-hf's layout and exports to a
Hugging Face model whose weights are the average of the source models' weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from kumihimo.cli import main
from kumihimo.core.errors import UserError
from kumihimo.pretrain import checkpoint_format
from kumihimo.pretrain.convert.average import average_checkpoints, average_tensor
from kumihimo.pretrain.convert.from_hf import convert_from_hf
from kumihimo.pretrain.convert.to_hf import convert_to_hf

VOCAB = 1000
HF_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def make_hf_model(folder: Path, seed: int, dtype: torch.dtype, spm_model: Path, **changes) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**HF_CONFIG, **changes}, tie_word_embeddings=False))
    with torch.no_grad():
        for param in model.parameters():  # norms too
            param.normal_(1.0 if param.dim() == 1 else 0.0, 0.05)
    model.to(dtype).save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
    return folder


def train_spm(prefix: Path) -> Path:
    import sentencepiece as spm

    from kumihimo.tokenizer import synthetic

    texts = [doc for lang in ("ja", "en") for doc in synthetic.documents(lang, 400, seed=1)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(prefix),
        vocab_size=VOCAB,
        model_type="unigram",
        byte_fallback=True,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("average")


@pytest.fixture(scope="module")
def spm_model(work) -> Path:
    return train_spm(work / "tok")


@pytest.fixture(scope="module")
def sources(work, spm_model) -> dict[str, list[tuple[Path, Path]]]:
    """{"fp32": [(hf folder, checkpoint root)] * 3, "bf16": [...] * 2}."""
    made: dict[str, list[tuple[Path, Path]]] = {}
    for name, dtype, seeds in (("fp32", torch.float32, (0, 1, 2)), ("bf16", torch.bfloat16, (3, 4))):
        made[name] = []
        for seed in seeds:
            hf = make_hf_model(work / f"hf-{name}-{seed}", seed, dtype, spm_model)
            root = convert_from_hf(hf, work / f"ckpt-{name}-{seed}")
            made[name].append((hf, root))
    return made


def load_whole(root: Path, work: Path) -> dict[str, object]:
    """Every item of a checkpoint's latest iteration, read by torch's own DCP -> torch.save converter."""
    folder = (
        root if (root / checkpoint_format.META_FILE).is_file() else checkpoint_format.find_checkpoint(root)
    )
    target = work / f"whole-{root.parent.name}-{root.name}.pt"
    if not target.exists():
        dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=False)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable float32 steps (same-sign values; ours are all nonzero normals)."""
    return int((a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max())


def test_uniform_average_is_bit_identical_to_in_memory_average(sources, work):
    roots = [root for _hf, root in sources["fp32"]]
    # An iter_ folder, a root (its latest) and another root.
    given = [checkpoint_format.iteration_dir(roots[0], 0), roots[1], roots[2]]
    output = average_checkpoints(given, work / "avg-fp32")
    averaged = load_whole(output, work)
    wholes = [load_whole(root, work) for root in roots]
    tensors = [key for key, value in averaged.items() if isinstance(value, torch.Tensor)]
    assert len(tensors) == 9  # embedding, 7 stacked layer tensors, final norm + head
    assert set(tensors) == {k for k, v in wholes[0].items() if isinstance(v, torch.Tensor)}
    for key in tensors:
        parts = [whole[key] for whole in wholes]
        expected = average_tensor(parts, [1.0, 1.0, 1.0])
        assert averaged[key].dtype == torch.float32
        assert torch.equal(averaged[key].view(torch.int32), expected.view(torch.int32)), key
        assert ulp_distance(averaged[key], torch.stack(parts).mean(0)) <= 1, key
        assert not torch.equal(averaged[key], parts[0])
    meta = json.loads((checkpoint_format.iteration_dir(output, 0) / checkpoint_format.META_FILE).read_text())
    assert meta["weights_only"] is True and meta["train_state"]["iteration"] == 0
    assert [s["weight"] for s in meta["source"]["averaged"]] == pytest.approx([1 / 3] * 3)
    assert [s["checkpoint"] for s in meta["source"]["averaged"]] == [
        str(checkpoint_format.iteration_dir(r, 0).resolve()) for r in roots
    ]
    assert Path(meta["tokenizer"]["path"]) == (output / "tokenizer" / "tokenizer.model").resolve()
    assert (
        meta["tokenizer"]["sha256"]
        == json.loads(
            (checkpoint_format.iteration_dir(roots[0], 0) / checkpoint_format.META_FILE).read_text()
        )["tokenizer"]["sha256"]
    )


def test_weighted_bf16_average_and_from_hf_layout(sources, work, capsys):
    from torch.distributed.checkpoint import FileSystemReader

    roots = [root for _hf, root in sources["bf16"]]
    output = work / "avg-bf16"
    assert main(["convert", "average", *map(str, roots), "--output", str(output), "--weights", "3", "1"]) == 0
    assert "average of 2 checkpoints" in capsys.readouterr().err
    averaged = load_whole(output, work)
    wholes = [load_whole(root, work) for root in roots]
    for key, value in averaged.items():
        if not isinstance(value, torch.Tensor):
            continue
        expected = average_tensor([w[key] for w in wholes], [3.0, 1.0]).to(torch.bfloat16)
        assert value.dtype == torch.bfloat16
        assert torch.equal(value.view(torch.int16), expected.view(torch.int16)), key
    # The same items, chunks and dtypes as the from-hf checkpoint (so it loads wherever that one does).
    ours = (
        FileSystemReader(str(checkpoint_format.iteration_dir(output, 0))).read_metadata().state_dict_metadata
    )
    theirs = (
        FileSystemReader(str(checkpoint_format.iteration_dir(roots[0], 0)))
        .read_metadata()
        .state_dict_metadata
    )
    assert ours.keys() == theirs.keys()
    for key, entry in theirs.items():
        assert type(ours[key]) is type(entry)
        if hasattr(entry, "chunks"):
            assert ours[key].chunks == entry.chunks and ours[key].size == entry.size, key
            assert ours[key].properties.dtype == entry.properties.dtype, key
    meta = json.loads((checkpoint_format.iteration_dir(output, 0) / checkpoint_format.META_FILE).read_text())
    assert [s["weight"] for s in meta["source"]["averaged"]] == [0.75, 0.25]


def test_output_run_config_names_no_run_folder_or_origin_of_the_sources(sources, work):
    """run_config.yaml of the average is checkpoint 1's model and data, but not its run's folders or
    origin: used as a recipe it would otherwise resume (and rotate) checkpoint 1's run."""
    import shutil

    import yaml

    first = work / "ckpt-of-a-run"
    shutil.copytree(sources["bf16"][0][1], first)
    config_file = checkpoint_format.iteration_dir(first, 0) / checkpoint_format.CONFIG_FILE
    saved = yaml.safe_load(config_file.read_text())
    saved["output_dir"] = str(work / "run-a")
    saved["checkpoint"].update(dir=str(work / "run-a" / "ckpt"), load=str(work / "run-a" / "ckpt"))
    config_file.write_text(yaml.safe_dump(saved))
    output = average_checkpoints([first, sources["bf16"][1][1]], work / "avg-of-a-run")
    written = yaml.safe_load(
        (checkpoint_format.iteration_dir(output, 0) / checkpoint_format.CONFIG_FILE).read_text()
    )
    assert written["model"] == saved["model"]
    assert written["output_dir"] == "runs/default"
    assert (written["checkpoint"]["dir"], written["checkpoint"]["load"]) == (None, None)
    assert written["checkpoint"]["pretrained"] is None and written["branch"]["source"] is None


def test_averaged_checkpoint_exports_to_the_average_of_the_hf_models(sources, work):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf_folders = [hf for hf, _root in sources["fp32"]]
    output = work / "avg-fp32-hf"
    averaged_root = work / "avg-fp32"
    if not averaged_root.exists():
        averaged_root = average_checkpoints([root for _hf, root in sources["fp32"]], averaged_root)
    convert_to_hf(averaged_root, output, dtype="fp32")
    model = LlamaForCausalLM.from_pretrained(output)
    state = model.state_dict()
    originals = [load_file(folder / "model.safetensors") for folder in hf_folders]
    for name in originals[0]:
        # Conversion only moves rows, so the export is the average of the source models, bit for bit.
        expected = average_tensor([o[name] for o in originals], [1.0, 1.0, 1.0])
        assert torch.equal(state[name], expected), name
    tokenizer = AutoTokenizer.from_pretrained(output, local_files_only=True)
    assert tokenizer.eos_token_id == 2
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 30]])).logits
    assert logits.shape == (1, 4, VOCAB) and torch.isfinite(logits).all()


def test_refusals_name_the_problem_and_leave_no_output(sources, work, spm_model):
    roots = [root for _hf, root in sources["fp32"]]
    wider = convert_from_hf(
        make_hf_model(work / "hf-wider", 0, torch.float32, spm_model, intermediate_size=128),
        work / "ckpt-wider",
    )
    output = work / "refused"
    cases = [
        (
            [roots[0], wider],
            None,
            r"checkpoint 2 \(.*ckpt-wider.*\): tensor decoder.layers.mlp.linear_fc1.weight has shape "
            r"\[2, 256, 64\] but checkpoint 1 .* has \[2, 192, 64\]",
        ),
        ([roots[0], sources["bf16"][0][1]], None, "has dtype torch.bfloat16 but checkpoint 1"),
        ([roots[0], work / "missing"], None, "does not exist"),
        ([roots[0]], None, "at least two checkpoints"),
        (roots[:2], [1.0], "one weight per checkpoint"),
        (roots[:2], [1.0, -1.0], "not a positive number"),
    ]
    for checkpoints, weights, message in cases:
        with pytest.raises(UserError, match=message):
            average_checkpoints(checkpoints, output, weights)
        assert not output.exists()
    assert not list(work.glob(".refused.tmp-*"))
    with pytest.raises(UserError, match="holds the output of `convert from-hf`, not of `convert average`"):
        average_checkpoints(roots[:2], roots[2])


AVERAGE_MEMORY_CHILD = """
import json, sys
from kumihimo.pretrain.convert.average import average_checkpoints
def status(field):
    return int(next(line for line in open('/proc/self/status') if line.startswith(field)).split()[1]) * 1024
warmup, big = sys.argv[1:3], sys.argv[3:6]
average_checkpoints(warmup, sys.argv[6])
open('/proc/self/clear_refs', 'w').write('5')  # the peak (VmHWM) restarts from the current RSS
before = status('VmRSS:')
average_checkpoints(big, sys.argv[7])
print(json.dumps({'before': before, 'peak': status('VmHWM:')}))
"""


@pytest.mark.slow  # writes and reads ~0.5 GB
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_memory_stays_near_one_tensor_not_the_models(tmp_path):
    """Averaging three checkpoints of a 16-layer model (236 MiB each) grows peak RSS by a few copies of
    its largest tensor (one layer's fc1, 8 MiB: DCP's byte buffer and loaded copy, the float32
    accumulator, the average kept for fc1's second chunk, the writer's serialisation), measured 52 MiB,
    far below one model, let alone three (holding the sources whole would add >= 708 MiB)."""
    import shutil

    from tests.test_convert_from_hf import MEMORY_CONFIG, WARMUP_CONFIG, _launch, write_layered_hf_model

    write_layered_hf_model(tmp_path / "hf-warmup", WARMUP_CONFIG)
    model_bytes, _layer_bytes = write_layered_hf_model(tmp_path / "hf", MEMORY_CONFIG)
    convert_from_hf(tmp_path / "hf-warmup", tmp_path / "warmup-0")
    shutil.copytree(tmp_path / "warmup-0", tmp_path / "warmup-1")
    convert_from_hf(tmp_path / "hf", tmp_path / "big-0")
    for copy in (1, 2):
        shutil.copytree(tmp_path / "big-0", tmp_path / f"big-{copy}")
    largest = 2 * MEMORY_CONFIG["intermediate_size"] * MEMORY_CONFIG["hidden_size"] * 4
    sources = [str(tmp_path / name) for name in ("warmup-0", "warmup-1", "big-0", "big-1", "big-2")]
    proc = _launch(
        ["-c", AVERAGE_MEMORY_CHILD, *sources, str(tmp_path / "avg-warmup"), str(tmp_path / "avg")]
    )
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    growth = result["peak"] - result["before"]
    assert growth < 8 * largest, (
        f"peak RSS grew by {growth / 2**20:.0f} MiB averaging 3 x {model_bytes / 2**20:.0f} MiB "
        f"(largest tensor {largest / 2**20:.0f} MiB)"
    )


@pytest.mark.slow  # two small training runs (the first at TP=2 with two processes)
def test_trainer_checkpoints_at_tp2_average_and_start_a_run(work, spm_model):
    """Two saves of a TP=2 run (each tensor stored as two TP chunks) average to the in-memory average of
    their model tensors, and the result initialises a TP=1 run through checkpoint.pretrained."""
    from tests.test_convert_from_hf import _launch

    run, root = work / "trained", work / "trained" / "checkpoints"
    common = [
        "model.num_layers=2",
        "schedule.lr_warmup_iters=0",
        "schedule.eval_interval=0",
        "data.mock=true",
        f"data.tokenizer={spm_model}",
    ]
    proc = _launch(
        [
            *(
                "-m",
                "torch.distributed.run",
                "--nproc-per-node=2",
                "--nnodes=1",
                "--standalone",
            ),
            *("-m", "kumihimo.cli", "train", "configs/pretrain/tiny-cpu.yaml", *common),
            *("schedule.train_iters=2", "checkpoint.save_interval=1", "checkpoint.keep_last=null"),
            *(f"output_dir={run}", f"checkpoint.dir={root}", "parallelism.tensor_model_parallel_size=2"),
        ]
    )
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    first = checkpoint_format.iteration_dir(root, 1)
    output = average_checkpoints([first, root], work / "avg-trained", weights=[1, 3])
    averaged = load_whole(output, work)
    wholes = [load_whole(first, work), load_whole(root, work)]
    model_keys = [k for k in averaged if isinstance(averaged[k], torch.Tensor)]
    assert "decoder.layers.self_attention.linear_qkv.weight" in model_keys
    for key in model_keys:
        expected = average_tensor([w[key] for w in wholes], [1.0, 3.0])
        assert torch.equal(averaged[key].view(torch.int32), expected.view(torch.int32)), key
    meta = json.loads((checkpoint_format.iteration_dir(output, 0) / checkpoint_format.META_FILE).read_text())
    assert [(s["iteration"], s["weight"]) for s in meta["source"]["averaged"]] == [(1, 0.25), (2, 0.75)]

    continued = work / "continued"
    proc = _launch(
        [
            *("-m", "kumihimo.cli", "train", "configs/pretrain/tiny-cpu.yaml", *common),
            *("schedule.train_iters=1", f"output_dir={continued}", f"checkpoint.pretrained={output}"),
        ]
    )
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert f"initialised weights from {checkpoint_format.iteration_dir(output, 0)}" in out


def test_tokenizer_copy_checks_the_recorded_identity(tmp_path, spm_model, capsys):
    """The output gets the tokenizer beside it: a SentencePiece file, or a Hugging Face folder's tokenizer
    files (not the rest of a model folder); a file that no longer has the recorded sha256 is not copied."""
    from types import SimpleNamespace

    from kumihimo.pretrain.convert.average import copy_tokenizer
    from kumihimo.tokenizer.base import load_tokenizer
    from kumihimo.tokenizer.hf import HFTokenizer
    from tests.test_data_prep_hf_tokenizer import make_hf_tokenizer

    hf_folder = make_hf_tokenizer(tmp_path / "hf-model", with_bos=True)
    (hf_folder / "model.safetensors").write_bytes(b"weights")
    cases = {
        "hf": HFTokenizer(hf_folder).identity(),
        "spm": load_tokenizer(spm_model).identity(),
        "changed": {**load_tokenizer(spm_model).identity(), "sha256": "0" * 64},
    }
    for name, identity in cases.items():
        staging, final = tmp_path / f"staging-{name}", tmp_path / f"out-{name}"
        staging.mkdir()
        copied = copy_tokenizer(SimpleNamespace(meta={"tokenizer": identity}), final, staging)
        if name == "changed":
            assert copied == identity and not (staging / "tokenizer").exists()
            assert "is not copied" in capsys.readouterr().err
            continue
        assert copied == {**identity, "path": copied["path"]}
        staged = staging / Path(copied["path"]).relative_to(final.resolve())
        assert load_tokenizer(staged).identity()["sha256"] == identity["sha256"]
        if name == "hf":
            assert not (staging / "tokenizer" / "model.safetensors").exists()


def test_qwen2_with_tied_embeddings_averages_like_the_hf_models(work):
    """Another family through the same path: QKV biases, tied embeddings, no tokenizer.model."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folders, roots = [], []
    for seed in (5, 6):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(Qwen2Config(**HF_CONFIG, tie_word_embeddings=True))
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(1.0 if param.dim() == 1 else 0.0, 0.05)
        model.save_pretrained(work / f"hf-qwen2-{seed}")
        folders.append(work / f"hf-qwen2-{seed}")
        roots.append(convert_from_hf(folders[-1], work / f"ckpt-qwen2-{seed}"))
    averaged = average_checkpoints(roots, work / "avg-qwen2")
    exported = convert_to_hf(averaged, work / "avg-qwen2-hf", dtype="fp32")
    originals = [load_file(folder / "model.safetensors") for folder in folders]
    state = Qwen2ForCausalLM.from_pretrained(exported).state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" in originals[0]
    for name in originals[0]:
        assert torch.equal(state[name], average_tensor([o[name] for o in originals], [1.0, 1.0])), name

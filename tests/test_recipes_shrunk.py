"""Every shipped pretraining recipe, shrunk to CPU sizes with its settings kept, runs on CPU.

tests/recipe_shrink.py shrinks each recipe of configs/pretrain (sizes, step counts, layout of at most 4
processes) and groups recipes whose shrunk settings coincide. The fast tier runs `kumihimo train
--check` on every shrunk recipe and makes sure what a CPU cannot run (Transformer Engine, FP8) is
refused in one line before the shrunk run swaps it. The slow tier trains one run per group for
TRAIN_ITERS steps, resumes a second run from the step-RESUME_FROM checkpoint the first one saved and
requires the losses and gradient norms after it to be identical, converts the checkpoint with `kumihimo
convert to-hf`, compares the Hugging Face logits with the Megatron model's and scores the export with
`kumihimo eval`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kumihimo.cli import main
from kumihimo.core import configtree
from kumihimo.pretrain.config import TrainConfig
from tests.conftest import REPO, read_metrics
from tests.recipe_shrink import RESUME_FROM, TRAIN_ITERS, Shrunk, groups, recipe_names, shrink

VOCAB = 1000  # the tokenizer of tests/test_convert_to_hf.py: padded to 1024 at TP 1 and 2

# Which recipes share a run, pinned: a new recipe fails test_every_recipe_has_a_shrunk_run until it is
# placed here (in the group its shrunk settings match, or as a new group, which the slow tier then runs).
EXPECTED_GROUPS = {
    "tiny-cpu": ["quickstart", "tiny-cpu"],
    "smoke-1gpu": ["smoke-1gpu"],
    "llmjp3-150m": ["llmjp3-1.8b", "llmjp3-150m", "llmjp3-3.7b", "llmjp3-440m", "llmjp3-980m", "llmjp3-base"],
    "llmjp3-7.2b": ["llmjp3-13b", "llmjp3-7.2b"],
    "llmjp3-7.2b-wsd": ["llmjp3-7.2b-wsd"],
    "llmjp3-7.2b-decay-branch": ["llmjp3-7.2b-decay-branch"],
    "llmjp3-172b": ["llmjp3-172b", "llmjp3-172b-fp8"],
    "swallow-llama3.1-8b": ["swallow-llama3.1-8b"],
    "tiny-moe-cpu": ["tiny-moe-cpu"],
    "llmjp4-32b-a3.8b": ["llmjp4-32b-a3.8b"],
    "llmjp4-moe-base": ["llmjp4-moe-base"],
    "llmjp4-291b-a27b": ["llmjp4-291b-a27b"],
    "llmjp3-8x13b": ["llmjp3-8x13b"],
}
BRANCH_TRUNK = {"llmjp3-7.2b-decay-branch": "llmjp3-7.2b-wsd"}
"""A branch recipe's shrunk run starts from the shrunk run of the recipe it branches from."""


def test_every_recipe_has_a_shrunk_run():
    found = {tuple(s.recipe for s in members) for members in groups().values()}
    expected = {tuple(members) for members in EXPECTED_GROUPS.values()}
    assert sorted(r for members in expected for r in members) == recipe_names(), (
        "configs/pretrain changed: place each recipe in EXPECTED_GROUPS (tests/test_recipes_shrunk.py)"
    )
    assert found == expected, "recipes whose shrunk settings differ cannot share a run (or vice versa)"
    for name, members in EXPECTED_GROUPS.items():
        assert name in members


def test_shrinking_keeps_the_settings():
    """Spot checks of what the shrink must not touch; the fingerprint covers the rest."""
    swallow = shrink("swallow-llama3.1-8b").config()
    scaling = swallow.model.rope_scaling
    assert (scaling.type, scaling.factor, scaling.original_max_position_embeddings) == ("llama3", 8.0, 64)
    assert swallow.model.max_position_embeddings == 1024  # 16 x the training sequence, as Llama 3.1's
    assert swallow.model.num_attention_heads // swallow.model.num_query_groups == 4
    assert swallow.parallelism.sequence_parallel and swallow.parallelism.use_distributed_optimizer
    assert swallow.checkpoint.async_save and swallow.precision.params_dtype == "bf16"
    big = shrink("llmjp3-172b")
    assert (
        big.nproc == 4 and big.config().model.num_attention_heads // big.config().model.num_query_groups == 6
    )
    branch = shrink("llmjp3-7.2b-decay-branch").config().schedule
    assert (branch.lr_decay_style, branch.lr_warmup_iters, branch.lr_wsd_decay_iters) == (
        "WSD",
        0,
        TRAIN_ITERS,
    )
    v4 = shrink("llmjp4-291b-a27b")
    moe, par = v4.config().model.moe, v4.config().parallelism
    assert (moe.num_experts, moe.router_topk, moe.z_loss_coeff, moe.router_dtype) == (4, 2, 1e-3, "fp32")
    assert (par.expert_model_parallel_size, par.expert_tensor_parallel_size) == (2, 1)
    assert (
        v4.config().model.recompute_modules == ["moe"]
        and v4.config().parallelism.virtual_pipeline_model_parallel_size == 2
    )
    assert [s.override for s in v4.cpu_swaps] == [
        "model.transformer_impl=local",
        "model.moe.grouped_gemm=false",
    ]
    base = shrink("llmjp3-150m").config()
    assert base.checkpoint.dense_intervals == [[9, 1], [100, 10], [1000, 100]] and base.model.z_loss_coeff > 0


# ------------------------------------------------------------------------------------------ fast: --check


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    from tests.test_convert_to_hf import train_spm

    return train_spm(tmp_path_factory.mktemp("tok") / "tok", seed=1)


def fake_checkpoint(root: Path, iteration: int, config: TrainConfig | None, meta: dict) -> Path:
    """A checkpoint root with markers and metadata only (--check reads no tensors)."""
    folder = root / f"iter_{iteration:07d}"
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "run_config.yaml").write_text(yaml.safe_dump(configtree.to_dict(config)))
    (folder / "kumihimo.json").write_text(json.dumps(meta))
    (root / "latest_checkpointed_iteration.txt").write_text(f"{iteration}\n")
    return root


def inputs_for_check(shrunk: Shrunk, tokenizer: Path, tmp_path: Path) -> list[str]:
    """Stand-ins for the checkpoints a recipe starts from (metadata only: --check reads no tensors)."""
    out = []
    if shrunk.needs_branch_source:
        trunk = shrink(BRANCH_TRUNK[shrunk.recipe]).config(tokenizer)
        state = {"iteration": TRAIN_ITERS, "consumed_samples": TRAIN_ITERS * 8}
        out.append(
            f"branch.source={fake_checkpoint(tmp_path / 'trunk', TRAIN_ITERS, trunk, {'train_state': state})}"
        )
    if shrunk.needs_pretrained:
        meta = {"weights_only": True, "vocab_size": VOCAB, "padded_vocab_size": 1024}
        out.append(f"checkpoint.pretrained={fake_checkpoint(tmp_path / 'imported', 0, None, meta)}")
    return out


@pytest.mark.parametrize("recipe", recipe_names())
def test_shrunk_recipe_passes_check_and_names_what_cpu_cannot_run(recipe, tokenizer, tmp_path, capsys):
    shrunk = shrink(recipe)
    args = [
        "train",
        str(shrunk.path),
        "--check",
        "--nproc-per-node",
        str(shrunk.nproc),
        *shrunk.overrides,
        f"data.tokenizer={tokenizer}",
        f"output_dir={tmp_path / 'run'}",
        *inputs_for_check(shrunk, tokenizer, tmp_path),
    ]
    for swap in shrunk.cpu_swaps:  # each one left out is refused, in one line saying why
        others = [s.override for s in shrunk.cpu_swaps if s is not swap]
        assert main([*args, *others]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and swap.refusal in err and "GPU" in err, err
    assert main([*args, *(s.override for s in shrunk.cpu_swaps)]) == 0
    out = capsys.readouterr().out
    assert f"config OK: world={shrunk.nproc}:" in out
    if shrunk.config().model.transformer_impl == "auto":
        assert "[check] model.transformer_impl=auto" in out and "Transformer Engine" in out


# ------------------------------------------------------------------------------------------ slow: train, resume, convert, eval

RUNS = list(EXPECTED_GROUPS)
PROMPT_LENGTH = 16
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=out, stderr=out)


def _train(shrunk: Shrunk, tokenizer: Path, run_dir: Path, extra: list[str]) -> subprocess.Popen:

    args = [
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={shrunk.nproc}",
        "--nnodes=1",
        "--standalone",
        "-m",
        "kumihimo.cli",
        "train",
        str(shrunk.path),
        *shrunk.all_overrides(tokenizer),
        f"output_dir={run_dir}",
        f"checkpoint.dir={run_dir / 'ckpt'}",
        *extra,
    ]
    return _start(args, run_dir.with_suffix(".log"))


def _latest(root: Path) -> int:
    from kumihimo.pretrain.checkpoint_format import read_latest

    return read_latest(root) or 0 if root.is_dir() else 0


def _imported_start(shrunk: Shrunk, tokenizer: Path, work: Path) -> Path:
    """What checkpoint.pretrained points at: a random Hugging Face Llama of the shrunk shape imported
    with `kumihimo convert from-hf` at the run's TP (the recipe's start, a Llama 3.1 import, in small)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = shrunk.config(tokenizer)
    model, scaling = config.model, config.model.rope_scaling
    rope_scaling = None
    if scaling.type != "none":
        rope_scaling = {
            "rope_type": scaling.type,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    hf = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.query_groups,
        max_position_embeddings=model.context_length,
        rope_theta=model.rotary_base,
        rope_scaling=rope_scaling,
        rms_norm_eps=model.norm_epsilon,
        tie_word_embeddings=model.tie_word_embeddings,
    )
    torch.manual_seed(0)
    folder = work / "hf-start"
    LlamaForCausalLM(hf).save_pretrained(folder)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    root = work / "imported"
    tp = str(config.parallelism.tensor_model_parallel_size)
    assert main(["convert", "from-hf", "--model", str(folder), "--output", str(root), "--tp", tp]) == 0
    return root


def _wait(procs: dict[str, subprocess.Popen], until=None, timeout: float = 800) -> dict[str, int]:
    """Wait for every process (or, with `until`, for `until()` to be true while they run); exit codes."""
    deadline = time.monotonic() + timeout
    while True:
        codes = {name: proc.poll() for name, proc in procs.items()}
        if until is not None and until():
            return codes
        if all(code is not None for code in codes.values()) or (until is not None and any(codes.values())):
            return codes
        if time.monotonic() > deadline:
            for proc in procs.values():
                proc.kill()
            raise AssertionError(f"still running after {timeout} s: {procs}")
        time.sleep(0.2)


def _straight_run(name: str, done: dict, work: Path, tokenizer: Path) -> dict:
    """A group's uninterrupted run, with the resumed run started from its step-RESUME_FROM checkpoint
    as soon as that is complete, and a process computing the Megatron model's logits of its final
    checkpoint (it imports megatron-core while the runs train). Cached in `done` (a branch needs its
    trunk's run)."""
    if name in done:
        return done[name]
    shrunk = shrink(name)
    folder = work / name
    run = {"straight": folder / "straight", "resumed": folder / "resumed"}
    extra = []
    if shrunk.needs_pretrained:
        extra.append(f"checkpoint.pretrained={_imported_start(shrunk, tokenizer, folder)}")
    if shrunk.needs_branch_source:
        trunk = _straight_run(BRANCH_TRUNK[name], done, work, tokenizer)
        extra.append(f"branch.source={trunk['straight'] / 'ckpt'}")
    procs = {"straight": _train(shrunk, tokenizer, run["straight"], extra)}
    torch.save(PROMPT, folder / "prompt.pt")
    reference = ["-m", "tests.test_recipes_shrunk", str(folder / "prompt.pt"), str(folder / "logits.pt")]
    procs["reference"] = _start([*reference, str(run["straight"] / "ckpt")], folder / "reference.log")
    codes = _wait(procs, until=lambda: _latest(run["straight"] / "ckpt") >= RESUME_FROM)
    if _latest(run["straight"] / "ckpt") >= RESUME_FROM:
        # what a run stopped after step RESUME_FROM leaves: that checkpoint and the marker naming it
        ckpt, iteration = run["resumed"] / "ckpt", f"iter_{RESUME_FROM:07d}"
        shutil.copytree(run["straight"] / "ckpt" / iteration, ckpt / iteration)
        (ckpt / "latest_checkpointed_iteration.txt").write_text(f"{RESUME_FROM}\n")
        procs["resumed"] = _train(shrunk, tokenizer, run["resumed"], extra)
    codes = _wait({key: proc for key, proc in procs.items() if key != "reference"})
    if codes["straight"] == 0:
        codes["reference"] = _wait({"reference": procs["reference"]})["reference"]
    else:
        procs["reference"].kill()
    for key in ("straight", "resumed", "reference"):
        run[f"{key}_code"] = codes.get(key)
        log = run[key].with_suffix(".log") if key != "reference" else folder / "reference.log"
        run[f"{key}_log"] = log
    if codes.get("reference") == 0:
        run["logits"] = torch.load(folder / "logits.pt")
        ckpt = str(run["straight"] / "ckpt")
        args = ["convert", "to-hf", "--checkpoint", ckpt, "--output", str(folder / "hf"), "--dtype", "fp32"]
        assert main(args) == 0
        run["hf"] = folder / "hf"
    done[name] = run
    return run


PROMPT = torch.randint(4, VOCAB, (2, PROMPT_LENGTH), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, dict]:
    return tmp_path_factory.mktemp("recipes"), {}


@pytest.fixture(scope="module", params=RUNS)
def group(request, work, tokenizer) -> dict:
    """One group's runs: `straight` (TRAIN_ITERS steps, saving along the way), `resumed` (from the
    RESUME_FROM checkpoint of `straight`), the Megatron `logits` of PROMPT and the export `hf`."""
    folder, done = work
    started = time.monotonic()
    run = _straight_run(request.param, done, folder, tokenizer)
    print(f"\n{request.param}: runs, reference and export in {time.monotonic() - started:.0f} s")
    return run


def assert_ran(run: dict, kind: str) -> None:
    code, log = run[f"{kind}_code"], run[f"{kind}_log"]
    tail = log.read_text()[-4000:] if log.is_file() else ""
    assert code == 0, f"{kind}: exit code {code}\n{tail}"


@pytest.mark.slow
@pytest.mark.parametrize("group", RUNS, indirect=True)
def test_shrunk_recipe_resumes_exactly(group):
    assert_ran(group, "straight")
    assert_ran(group, "resumed")
    straight, resumed = read_metrics(group["straight"]), read_metrics(group["resumed"])
    assert [m["step"] for m in straight] == list(range(1, TRAIN_ITERS + 1))
    assert [m["step"] for m in resumed] == list(range(RESUME_FROM + 1, TRAIN_ITERS + 1))
    for after, before in zip(resumed, straight[RESUME_FROM:], strict=True):
        for key in ("loss", "grad_norm", "lr", "consumed_tokens", "val_loss"):
            assert after.get(key) == before.get(key), (after["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("group", RUNS, indirect=True)
def test_shrunk_recipe_converts_with_matching_logits(group):
    from transformers import AutoModelForCausalLM

    assert_ran(group, "straight")
    assert_ran(group, "reference")
    model = AutoModelForCausalLM.from_pretrained(group["hf"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(PROMPT).logits
    expected = group["logits"][..., :VOCAB]  # the export trims Megatron's padding rows
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("group", RUNS, indirect=True)
def test_shrunk_recipe_export_evaluates(group, tmp_path):
    from tests.eval_tasks import write_tasks

    assert_ran(group, "reference")
    tasks = [str(p) for p in write_tasks(tmp_path / "tasks", ("jcqa",))]
    output = tmp_path / "eval"
    args = ["eval", str(group["hf"]), "--tasks", *tasks, "--output", str(output), "--device", "cpu"]
    assert main(args) == 0
    assert 0 <= json.loads((output / "results.json").read_text())["tasks"]["jcqa"]["acc"] <= 1


def _megatron_logits(prompt_path: str, out_path: str, root: str) -> None:
    """Wait for the run's final checkpoint, build its GPTModel at TP=1/PP=1 (world size 1, gloo), load
    it, cast it to fp32 (the export is fp32) and save the logits of the prompt."""
    import torch.distributed as dist

    from kumihimo.pretrain import cpu_compat

    cpu_compat.activate()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kumihimo.pretrain.checkpoint_format import SHARDING_METADATA, find_checkpoint, read_meta
    from kumihimo.pretrain.parallel import ParallelLayout
    from tests.conftest import build_run_model

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0, inference_rng_tracker=True)
    while _latest(Path(root)) < TRAIN_ITERS:  # the marker is written last, atomically
        time.sleep(0.5)
    folder = find_checkpoint(Path(root))
    data = configtree.read_yaml(folder / "run_config.yaml")
    data["parallelism"] = {}
    config = configtree.from_dict(TrainConfig, data)
    meta = read_meta(folder)
    (model,) = build_run_model(config, ParallelLayout.from_config(config, 1), meta["padded_vocab_size"])
    sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
    loaded = dist_checkpointing.load(sharded, str(folder))
    model.load_state_dict({key: value for key, value in loaded.items() if key in sharded})
    model.float().eval()
    prompt = torch.load(prompt_path)
    positions = torch.arange(prompt.shape[1]).expand_as(prompt)
    with torch.no_grad():
        torch.save(model(prompt, positions, None), out_path)


if __name__ == "__main__":
    _megatron_logits(*sys.argv[1:])

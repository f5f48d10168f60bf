"""Megatron-Core on CPU with gloo: parallel layouts agree with one process, and resume is exact.

Each run is the real `kumihimo train` CLI (torchrun with 2 processes where a layout needs them) on
the tiny recipe with mock data, so these tests cover the launcher, the trainer and checkpointing.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow  # multi-process training runs (gloo) compared with one process

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = (
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "schedule.train_iters=4",
    "model.z_loss_coeff=1e-4",
    "logging.log_interval=1",
)


def train(run_dir, *overrides, nproc=1):
    args = ["train", TINY, *BASE, f"output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *overrides]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    proc = run_cli(*args, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single_dir(tmp_path_factory):
    """TP=1, PP=1, one process: the reference run."""
    run_dir = tmp_path_factory.mktemp("single")
    train(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def single(single_dir):
    """The reference loss curve."""
    return read_metrics(single_dir)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp2")
    train(run_dir, "parallelism.tensor_model_parallel_size=2", nproc=2)
    return run_dir


def losses(metrics):
    return [m["loss"] for m in metrics]


def test_tp2_first_step_loss_equals_single_process(single, tp2):
    tp2_losses = losses(read_metrics(tp2))
    assert abs(tp2_losses[0] - single[0]["loss"]) < 1e-5
    # Later steps agree closely too (only reduction order differs).
    assert tp2_losses == pytest.approx(losses(single), abs=1e-4)


def test_pp2_first_step_loss_equals_single_process(single, tmp_path):
    train(tmp_path, "parallelism.pipeline_model_parallel_size=2", nproc=2)
    pp2 = read_metrics(tmp_path)
    assert abs(pp2[0]["loss"] - single[0]["loss"]) < 1e-5
    assert losses(pp2) == pytest.approx(losses(single), abs=1e-4)
    assert_plan_counts_parameters(tmp_path, "parallelism.pipeline_model_parallel_size=2", world=2)


def test_plan_counts_parameters_exactly(tp2):
    assert_plan_counts_parameters(tp2, "parallelism.tensor_model_parallel_size=2", world=2)


def assert_plan_counts_parameters(run_dir, override, world):
    """`kumihimo plan`'s per-GPU parameter count equals what each rank of the real run held."""
    from kumihimo.core import configtree
    from kumihimo.pretrain.config import TrainConfig
    from kumihimo.pretrain.parallel import ParallelLayout
    from kumihimo.pretrain.plan import stage_params

    config = configtree.load(TrainConfig, TINY, [override])
    layout = ParallelLayout.from_config(config, world)
    padded = layout.padded_vocab_size(config.data.mock_vocab_size, config.model.make_vocab_size_divisible_by)
    for row in json.loads((run_dir / "parameters_per_rank.json").read_text()):
        assert row["parameters"] == stage_params(config.model, layout, padded, row["pp_rank"]), row


def test_loss_falls(single):
    assert single[-1]["loss"] < single[0]["loss"] - 0.1


def test_resume_is_exact_at_tp2(tp2, tmp_path):
    """4 steps straight == 2 steps, save, exit, resume, 2 steps: same losses and grad norms."""
    train(tmp_path, "parallelism.tensor_model_parallel_size=2", "schedule.exit_after_iters=2", nproc=2)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    proc = train(tmp_path, "parallelism.tensor_model_parallel_size=2", nproc=2)
    assert "resumed from" in proc.stderr
    straight, resumed = read_metrics(tp2), read_metrics(tmp_path)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert losses(resumed) == losses(straight)
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in straight]


def test_resume_at_another_layout_continues_the_curve(tp2, tmp_path):
    """A TP=2 checkpoint resumed with PP=2 continues the same loss curve (reduction order aside)."""
    train(tmp_path, "parallelism.tensor_model_parallel_size=2", "schedule.exit_after_iters=2", nproc=2)
    train(tmp_path, "parallelism.pipeline_model_parallel_size=2", nproc=2)
    assert losses(read_metrics(tmp_path)) == pytest.approx(losses(read_metrics(tp2)), abs=1e-4)


def test_resume_with_other_data_is_refused(tmp_path):
    train(tmp_path, "schedule.exit_after_iters=1")
    proc = run_cli(
        "train",
        TINY,
        *BASE,
        f"output_dir={tmp_path}",
        f"checkpoint.dir={tmp_path}/ckpt",
        "runtime.seed=7",
    )
    assert proc.returncode == 2
    assert "the data changed since iter_0000001: seed 1234 -> 7" in proc.stderr


def test_interleaved_pipeline_matches_and_converts_like_single_process(single, single_dir, tmp_path):
    """PP=2 with 2 virtual stages per rank: same losses, and its checkpoint (two model chunks per rank)
    converts to the same Hugging Face weights as the one-process run's."""
    from safetensors.torch import load_file

    from kumihimo.pretrain.convert.to_hf import convert_to_hf

    vpp_dir = tmp_path / "vpp"
    train(
        vpp_dir,
        "parallelism.pipeline_model_parallel_size=2",
        "parallelism.virtual_pipeline_model_parallel_size=2",
        nproc=2,
    )
    assert losses(read_metrics(vpp_dir)) == pytest.approx(losses(single), abs=1e-4)

    def weights(run_dir):
        out = convert_to_hf(run_dir / "ckpt", tmp_path / f"hf-{run_dir.name}", dtype="fp32")
        tensors = {}
        for shard in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(shard))
        return tensors

    vpp, reference = weights(vpp_dir), weights(single_dir)
    assert vpp.keys() == reference.keys() and len(vpp) > 10
    for name, tensor in reference.items():
        assert torch.allclose(vpp[name], tensor, atol=1e-5), name


def assert_matches_single(run_dir, single):
    """Same losses and gradient norms as one process: a gradient that misses a reduction (e.g. a norm
    weight's partial gradient under sequence parallelism) shows up in the norm at step 1."""
    metrics = read_metrics(run_dir)
    assert abs(metrics[0]["loss"] - single[0]["loss"]) < 1e-5
    assert losses(metrics) == pytest.approx(losses(single), abs=1e-4)
    assert [m["grad_norm"] for m in metrics] == pytest.approx([m["grad_norm"] for m in single], rel=1e-4)


def test_sequence_parallel_on_the_local_spec_matches_single_process(single, tmp_path):
    train(tmp_path, "parallelism.tensor_model_parallel_size=2", "parallelism.sequence_parallel=true", nproc=2)
    assert_matches_single(tmp_path, single)


def test_context_parallel_matches_single_process_and_resumes_exactly(single, tmp_path):
    """CP=2 on the local spec (SDPA over all-gathered keys/values, zigzag chunks): same curve as one
    process; a CP=2 checkpoint resumes to the same losses as the uninterrupted CP=2 run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, "parallelism.context_parallel_size=2", nproc=2)
    assert_matches_single(straight, single)
    train(resumed, "parallelism.context_parallel_size=2", "schedule.exit_after_iters=2", nproc=2)
    train(resumed, "parallelism.context_parallel_size=2", nproc=2)
    assert losses(read_metrics(resumed)) == losses(read_metrics(straight))


def test_overlapped_grad_reduce_and_param_gather_match_single_process(single, tmp_path):
    train(
        tmp_path,
        "parallelism.use_distributed_optimizer=true",
        "parallelism.overlap_grad_reduce=true",
        "parallelism.overlap_param_gather=true",
        nproc=2,
    )
    assert_matches_single(tmp_path, single)


@pytest.mark.parametrize(
    "layout",
    [
        ("parallelism.tensor_model_parallel_size=2", "parallelism.pipeline_model_parallel_size=2"),
        (
            "parallelism.tensor_model_parallel_size=2",
            "parallelism.sequence_parallel=true",
            "parallelism.context_parallel_size=2",
        ),
    ],
    ids=["tp2-pp2", "tp2-sp-cp2"],
)
def test_four_process_layouts_match_single_process(single, tmp_path, layout):
    train(tmp_path, *layout, nproc=4)
    assert_matches_single(tmp_path, single)


@pytest.mark.parametrize(
    "recompute",
    [("model.recompute=full",), ("model.recompute=selective", "model.recompute_modules=[core_attn,mlp]")],
    ids=["full", "selective"],
)
def test_recompute_matches_single_process(single, tmp_path, recompute):
    train(tmp_path, *recompute)
    assert_matches_single(tmp_path, single)

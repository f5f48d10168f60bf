"""Mixture of experts on CPU with gloo: expert-parallel layouts agree with one process (aux loss and
router z-loss included), resume is exact with the distributed optimizer, and the router's load-balance
statistics reach metrics.jsonl.

Each run is the real `kumihimo train` CLI on the tiny MoE recipe (4 experts, top-2) with mock data.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow  # multi-process training runs (gloo) compared with one process

TINY_MOE = "configs/pretrain/tiny-moe-cpu.yaml"
BASE = (
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "schedule.train_iters=4",
    "model.z_loss_coeff=1e-4",
    "logging.log_interval=1",
)
EP2 = (
    "parallelism.expert_model_parallel_size=2",
    "parallelism.use_distributed_optimizer=true",
    "model.moe.token_dispatcher=allgather",  # the TP=2 x EP=2 test runs the all-to-all one
)


def train(run_dir, *overrides, nproc=1):
    args = ["train", TINY_MOE, *BASE, f"output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *overrides]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moe-single")
    proc = train(run_dir)
    return read_metrics(run_dir), proc


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moe-ep2")
    train(run_dir, *EP2, nproc=2)
    return run_dir


def column(metrics, key):
    return [m[key] for m in metrics]


def assert_matches_single(metrics, single_metrics):
    """Same language-model loss, gradient norm, aux loss, router z-loss and routing as one process."""
    assert abs(metrics[0]["loss"] - single_metrics[0]["loss"]) < 1e-5
    for key in ("loss", "moe_aux_loss", "moe_z_loss"):
        assert column(metrics, key) == pytest.approx(column(single_metrics, key), abs=1e-4), key
    assert column(metrics, "grad_norm") == pytest.approx(column(single_metrics, "grad_norm"), rel=1e-4)
    # routing decisions of step 1 are made by identical weights on identical tokens
    assert metrics[0]["moe_tokens_per_expert"] == single_metrics[0]["moe_tokens_per_expert"]


def test_router_statistics_are_logged(single):
    metrics, proc = single
    first = metrics[0]
    counts = first["moe_tokens_per_expert"]
    # 4 MoE layers x 4 experts; every token goes to 2 experts: 8 sequences x 128 tokens x 2
    assert len(counts) == 4 and all(len(row) == 4 and sum(row) == 8 * 128 * 2 for row in counts)
    assert first["moe_aux_loss"] == pytest.approx(1.0, abs=0.05)  # balanced routing at init gives ~1
    assert first["moe_z_loss"] > 0
    assert first["moe_max_load"] >= 1 >= first["moe_min_load"] > 0
    assert "aux 1.0" in proc.stderr and "busiest expert" in proc.stderr
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_ep2_allgather_with_distributed_optimizer_matches_single_process(single, ep2):
    assert_matches_single(read_metrics(ep2), single[0])


def test_tp2_ep2_matches_single_process(single, tmp_path):
    """TP=2 x EP=2 (expert TP = 2, sequence parallel) with the all-to-all dispatcher, whose all-to-all
    and uneven gathers over expert-TP ranks run on gloo (cpu_compat)."""
    train(
        tmp_path,
        "parallelism.tensor_model_parallel_size=2",
        "parallelism.sequence_parallel=true",
        "parallelism.expert_model_parallel_size=2",
        nproc=4,
    )
    assert_matches_single(read_metrics(tmp_path), single[0])


def test_ep2_resume_with_distributed_optimizer_is_exact(ep2, tmp_path):
    """4 steps straight == 2 steps, save, exit, resume, 2 steps: same losses, aux losses and grad norms."""
    train(tmp_path, *EP2, "schedule.exit_after_iters=2", nproc=2)
    proc = train(tmp_path, *EP2, nproc=2)
    assert "resumed from" in proc.stderr
    straight, resumed = read_metrics(ep2), read_metrics(tmp_path)
    assert column(resumed, "step") == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_z_loss", "moe_tokens_per_expert"):
        assert column(resumed, key) == column(straight, key), key

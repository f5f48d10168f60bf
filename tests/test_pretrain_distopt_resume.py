"""The distributed optimizer (`parallelism.use_distributed_optimizer=true`, what every large recipe runs
with) resumes exactly, and a checkpoint it saved either loads at another layout or is refused in one line.

Each case is the real `kumihimo train` CLI (torchrun, gloo) on the tiny recipe: a straight run saves at
step 2 and goes on to step 5; a second run resumes from a copy of that step-2 checkpoint and must log
the same losses and gradient norms, bit for bit, for steps 3-5.
"""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import read_metrics, run_cli

pytestmark = pytest.mark.slow  # multi-process training runs (gloo)

TINY = "configs/pretrain/tiny-cpu.yaml"
BASE = (
    "schedule.lr_warmup_iters=1",
    "schedule.eval_interval=0",
    "schedule.train_iters=5",
    "model.z_loss_coeff=1e-4",
    "logging.log_interval=1",
    "checkpoint.save_interval=2",
    "checkpoint.keep_last=3",
    "parallelism.use_distributed_optimizer=true",
)
TP2, PP2 = "parallelism.tensor_model_parallel_size=2", "parallelism.pipeline_model_parallel_size=2"
OVERLAP = ("parallelism.overlap_grad_reduce=true", "parallelism.overlap_param_gather=true")


def train(run_dir, *overrides, nproc=2, expect=0):
    args = ["train", TINY, *BASE, f"output_dir={run_dir}", f"checkpoint.dir={run_dir}/ckpt", *overrides]
    if nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    proc = run_cli(*args, timeout=300)
    if expect is not None:
        assert proc.returncode == expect, proc.stderr[-3000:]
    return proc


def copy_checkpoint(source_run, step, target_run):
    """A new run folder whose only checkpoint is `source_run`'s step `step`."""
    name = f"iter_{step:07d}"
    (target_run / "ckpt").mkdir(parents=True)
    shutil.copytree(source_run / "ckpt" / name, target_run / "ckpt" / name)
    (target_run / "ckpt" / "latest_checkpointed_iteration.txt").write_text(f"{step}\n")


def curve(run_dir):
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def dp2_straight(tmp_path_factory):
    """DP=2 with the distributed optimizer: 5 steps, saving at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("dp2")
    train(run_dir)
    return run_dir


@pytest.mark.parametrize(
    ("layout", "nproc"),
    [((), 2), (OVERLAP, 2), ((TP2,), 4), ((PP2,), 2)],
    ids=["dp2", "dp2-overlapped", "dp2-tp2", "pp2"],
)
def test_distributed_optimizer_resumes_exactly(tmp_path, request, layout, nproc):
    if layout:
        straight = tmp_path / "straight"
        train(straight, *layout, nproc=nproc)
    else:
        straight = request.getfixturevalue("dp2_straight")
    resumed = tmp_path / "resumed"
    copy_checkpoint(straight, 2, resumed)
    proc = train(resumed, *layout, nproc=nproc)
    assert "resumed from" in proc.stderr
    after = curve(resumed)
    assert [step for step, _, _ in after] == [3, 4, 5]
    assert after == curve(straight)[2:]


def test_every_data_parallel_rank_writes_its_share(dp2_straight):
    """Replicated tensors (the model weights, replicated over DP) are written by all DP ranks, not by DP
    rank 0 alone (3.44 MB vs 2.03 MB before, 2.76 MB vs 2.71 MB after), and such a checkpoint resumes
    exactly (test_distributed_optimizer_resumes_exactly[dp2] loads this one's step 2)."""
    shards = sorted((dp2_straight / "ckpt" / "iter_0000002").glob("__*_0.distcp"))
    sizes = [shard.stat().st_size for shard in shards]
    assert len(sizes) == 2 and min(sizes) > 0.9 * max(sizes), sizes


def test_distributed_optimizer_checkpoint_resumes_at_another_data_parallel_size(tmp_path, dp2_straight):
    """DP=2 -> DP=1 (the dp_reshardable format regroups the buckets): steps 3-5 match a straight DP=1
    run within fp32 tolerance (only reduction order differs)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, nproc=1)
    copy_checkpoint(dp2_straight, 2, resumed)
    proc = train(resumed, nproc=1)
    assert "data-parallel size changed 2 -> 1" in proc.stderr
    after, reference = curve(resumed), curve(straight)[2:]
    assert [step for step, _, _ in after] == [3, 4, 5]
    assert [loss for _, loss, _ in after] == pytest.approx([loss for _, loss, _ in reference], abs=1e-4)
    assert [norm for _, _, norm in after] == pytest.approx([norm for _, _, norm in reference], rel=1e-3)


def test_distributed_optimizer_checkpoint_resumes_at_a_larger_data_parallel_size(tmp_path, dp2_straight):
    """DP=2 -> DP=4 (4 processes; 2 samples per micro-batch so that the global batch of 8 splits over 4
    ranks, which leaves each micro-batch's token-mean loss and so the gradient unchanged): steps 3-5
    match a straight DP=4 run within fp32 tolerance (only reduction order differs; measured: equal losses,
    gradient norms within 1.1e-7 relative)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, "schedule.micro_batch_size=2", nproc=4)
    copy_checkpoint(dp2_straight, 2, resumed)
    proc = train(resumed, "schedule.micro_batch_size=2", nproc=4)
    assert "data-parallel size changed 2 -> 4" in proc.stderr
    after, reference = curve(resumed), curve(straight)[2:]
    assert [step for step, _, _ in after] == [3, 4, 5]
    assert [loss for _, loss, _ in after] == pytest.approx([loss for _, loss, _ in reference], abs=1e-5)
    assert [norm for _, _, norm in after] == pytest.approx([norm for _, _, norm in reference], rel=1e-5)


def test_distributed_optimizer_checkpoint_at_another_tensor_parallel_size_is_refused(tmp_path, dp2_straight):
    """DP=2 -> TP=2 cannot load the bucket-shaped optimizer state (megatron-core raised a raw KeyError):
    one line saying which layout loads it and how to start from its weights instead."""
    copy_checkpoint(dp2_straight, 2, tmp_path)
    proc = train(tmp_path, TP2, nproc=2, expect=None)
    assert proc.returncode != 0
    assert "KeyError" not in proc.stderr
    assert (
        "holds distributed-optimizer state saved at TP=1 PP=1 VPP=1, which loads only at the same TP, PP and "
        "virtual pipeline size (DP and CP may change); resume with parallelism.tensor_model_parallel_size=1"
    ) in proc.stderr

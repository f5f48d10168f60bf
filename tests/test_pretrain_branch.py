"""Branches (`branch.source`): a run that starts from another run's checkpoint with model and optimizer
state but a new blend and a new learning-rate schedule.

The contract: a branch after N steps equals, bit for bit at TP=2, a run that trained N steps and then
switched data and schedule in the same process; the branch's learning rate is exactly the configured
schedule's (a fresh run of the branch config logs the same column, although the source used another
peak LR and decay); a requeued branch resumes from its own checkpoints; lineage is recorded.

Runs are the real `kumihimo train` CLI (torchrun, 2 processes, gloo) on the tiny CPU recipe with a
1000-piece tokenizer and two small synthetic datasets; the in-process reference is `_reference` below.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from kumihimo.core import configtree
from kumihimo.data_prep.indexed import IndexedDatasetWriter
from kumihimo.pretrain import checkpoint_format, preflight
from kumihimo.pretrain.config import TrainConfig
from tests.conftest import REPO, read_metrics, run_cli

pytestmark = pytest.mark.slow  # several 2-process training runs

TINY = "configs/pretrain/tiny-cpu.yaml"
COMMON = (
    "schedule.eval_interval=0",
    "logging.log_interval=1",
    "data.mock=false",
    "data.split=90,10,0",
    "parallelism.tensor_model_parallel_size=2",
)
SOURCE_STEPS = 3
BRANCH_STEPS = 3
# The source: cosine from peak 3e-3; the branch: a WSD decay (minus_sqrt) from another peak, 2e-3.
SOURCE_SCHEDULE = (
    f"schedule.train_iters={SOURCE_STEPS + 5}",
    f"schedule.exit_after_iters={SOURCE_STEPS}",
    "schedule.lr_warmup_iters=1",
)
BRANCH_SCHEDULE = (
    f"schedule.train_iters={BRANCH_STEPS}",
    "schedule.lr_warmup_iters=0",
    "schedule.lr_decay_style=WSD",
    f"schedule.lr_wsd_decay_iters={BRANCH_STEPS}",
    "schedule.lr_wsd_decay_style=minus_sqrt",
    "optimizer.lr=2.0e-3",
    "optimizer.min_lr=1.0e-4",
)


def write_dataset(prefix: Path, seed: int, num_docs: int = 120) -> None:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(40, 200, num_docs)
    writer = IndexedDatasetWriter(prefix, vocab_size=1000)
    writer.add_documents(rng.integers(4, 1000, int(lengths.sum())), lengths)
    writer.finish()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("branch")


@pytest.fixture(scope="module")
def data(work) -> dict[str, str]:
    """The source blend (web only) and the branch's mid-training mix (web + wiki), as overrides."""
    from tests.test_convert_to_hf import train_spm

    tokenizer = train_spm(work / "tok", seed=1)
    web, wiki = work / "data" / "web", work / "data" / "wiki"
    write_dataset(web, seed=0)
    write_dataset(wiki, seed=1)
    return {
        "tokenizer": f"data.tokenizer={tokenizer}",
        "source": f"data.blend=[{{prefix: {web}, weight: 1.0}}]",
        "branch": f"data.blend=[{{prefix: {web}, weight: 0.3}}, {{prefix: {wiki}, weight: 0.7}}]",
    }


def source_args(data, out: Path) -> list[str]:
    return [*COMMON, *SOURCE_SCHEDULE, data["tokenizer"], data["source"], f"output_dir={out}"]


def branch_args(data, out: Path) -> list[str]:
    return [*COMMON, *BRANCH_SCHEDULE, data["tokenizer"], data["branch"], f"output_dir={out}"]


def train(*args: str) -> subprocess.CompletedProcess:
    proc = run_cli("train", TINY, *args, "--nproc-per-node", "2", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def source(work, data) -> Path:
    """The source run: 3 steps on the web blend (its schedule planned for 8), saved at step 3."""
    out = work / "source"
    train(*source_args(data, out))
    assert checkpoint_format.read_latest(out / "checkpoints") == SOURCE_STEPS
    return out


@pytest.fixture(scope="module")
def branch(work, data, source) -> Path:
    """The branch, requeued once: 1 step (saved), then a second job resumes from its own checkpoint."""
    out = work / "branch"
    args = [*branch_args(data, out), f"branch.source={source / 'checkpoints'}"]
    first = train(*args, "schedule.exit_after_iters=1")
    assert "branched from" in first.stderr
    second = train(*args)
    assert "resumed from" in second.stderr and "branched from" not in second.stderr
    return out


@pytest.fixture(scope="module")
def reference(work, data) -> Path:
    """Source and branch in one process (torchrun, 2 processes): the data and schedule switch at step 3."""
    out = work / "reference"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--nnodes=1",
        "--standalone",
        "-m",
        "tests.test_pretrain_branch",
        json.dumps(
            [
                [*source_args(data, out / "source"), "checkpoint.enabled=false"],
                [*branch_args(data, out / "branch"), "checkpoint.enabled=false"],
            ]
        ),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def columns(metrics: list[dict], *names: str) -> list[tuple]:
    return [tuple(m[name] for name in names) for m in metrics]


def test_branch_equals_switching_data_in_process_at_tp2(branch, reference):
    got, want = read_metrics(branch), read_metrics(reference / "branch")
    assert [m["step"] for m in got] == list(range(1, BRANCH_STEPS + 1))
    # bit for bit: losses, gradient norms and learning rates, through a save, a load and a requeue
    assert columns(got, "loss", "grad_norm", "lr") == columns(want, "loss", "grad_norm", "lr")
    assert read_metrics(reference / "source")[-1]["loss"] != got[0]["loss"]  # the data did change


def test_branch_learning_rate_is_exactly_the_configured_schedule(work, data, branch, source):
    """Not the source's peak (3e-3) nor its cosine position: a fresh run of the branch config (no
    source at all) logs the same learning rates."""
    fresh = work / "fresh"
    train(*branch_args(data, fresh))
    got = [m["lr"] for m in read_metrics(branch)]
    assert got == [m["lr"] for m in read_metrics(fresh)]
    assert got[0] == 2.0e-3 and got[-1] < got[0]
    assert [m["lr"] for m in read_metrics(source)][0] != got[0]


def test_branch_records_its_lineage(branch, source):
    folder = checkpoint_format.find_checkpoint(source / "checkpoints")
    digest = hashlib.sha256(
        (folder / checkpoint_format.CONFIG_FILE).read_bytes()
        + (folder / checkpoint_format.META_FILE).read_bytes()
    ).hexdigest()
    saved = yaml.safe_load((branch / "run_config.yaml").read_text())["branch"]
    assert saved == {
        "source": str(source / "checkpoints"),
        "iteration": SOURCE_STEPS,
        "source_sha256": digest,
    }
    source_meta = checkpoint_format.read_meta(folder)
    for step in (1, BRANCH_STEPS):  # written by the first job and by the requeued one
        meta = checkpoint_format.read_meta(checkpoint_format.find_checkpoint(branch / "checkpoints", step))
        lineage = meta["lineage"]
        assert lineage["source"] == str(folder.resolve())
        assert lineage["iteration"] == SOURCE_STEPS and lineage["source_sha256"] == digest
        assert lineage["source_data_fingerprint"] == source_meta["data_fingerprint"]
        assert lineage["source_consumed_samples"] == source_meta["train_state"]["consumed_samples"]
        assert meta["train_state"]["iteration"] == step
        assert meta["train_state"]["consumed_samples"] == step * 8  # the new blend's position from 0
        assert meta["data_fingerprint"] != source_meta["data_fingerprint"]


def test_branch_refuses_a_source_that_changed_since_it_was_recorded(work, data, source):
    proc = run_cli(
        "train",
        TINY,
        *branch_args(data, work / "mismatch"),
        f"branch.source={source / 'checkpoints'}",
        "branch.source_sha256=0123abcd",
        "--nproc-per-node",
        "2",
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "branch.source_sha256='0123abcd' does not match" in proc.stderr


def test_branch_settings_that_contradict_each_other_are_refused(tmp_path):
    source = f"branch.source={tmp_path}/src"
    assert configtree.load(TrainConfig, TINY, [source, "branch.iteration=5"]).branch.iteration == 5
    for extra, message in (
        ("checkpoint.load=/x", "branch.source and checkpoint.load"),
        ("checkpoint.pretrained=/x", "branch.source and checkpoint.pretrained"),
    ):
        with pytest.raises(configtree.ConfigError, match=message):
            configtree.load(TrainConfig, TINY, [source, extra])
    with pytest.raises(configtree.ConfigError, match="branch.iteration=-1"):
        configtree.load(TrainConfig, TINY, [f"branch.source={tmp_path}/src", "branch.iteration=-1"])
    with pytest.raises(configtree.ConfigError, match="needs branch.source"):
        configtree.load(TrainConfig, TINY, ["branch.iteration=3"])
    # its own checkpoint folder as its source: it would overwrite what it branches from
    config = configtree.load(
        TrainConfig, TINY, [f"output_dir={tmp_path}", f"branch.source={tmp_path}/checkpoints"]
    )
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(configtree.ConfigError, match="is this run's own checkpoint folder"):
        preflight.check_paths(config)


# ------------------------------------------------------------------------------ in-process reference


def _reference(source_overrides: list[str], branch_overrides: list[str]) -> None:
    """In every torchrun process: train the source config, then switch, in the same process and with the
    same model and optimizer objects, to the branch's data, learning-rate schedule and step counters."""
    from kumihimo.pretrain.checkpoint_format import TrainState
    from kumihimo.pretrain.data import build_datasets
    from kumihimo.pretrain.distributed import destroy
    from kumihimo.pretrain.metrics import MetricsSink
    from kumihimo.pretrain.optimizer import build_scheduler
    from kumihimo.pretrain.signals import LossGuard
    from kumihimo.pretrain.training import Trainer

    source = configtree.load(TrainConfig, TINY, source_overrides)
    branch = configtree.load(TrainConfig, TINY, branch_overrides)
    trainer = Trainer(source)
    try:
        trainer.setup()
        trainer.train()
        trainer.config = branch
        trainer.datasets = build_datasets(branch, Path(branch.output_dir) / "data_cache")
        for group in trainer.optimizer.param_groups:  # the branch's peak and floor
            group["max_lr"], group["min_lr"] = branch.optimizer.lr, branch.optimizer.min_lr
        trainer.scheduler = build_scheduler(branch.optimizer, branch.schedule, trainer.optimizer)
        trainer.state = TrainState()
        trainer.loss_guard = LossGuard(branch.resilience.spike_factor, branch.resilience.spike_warmup_steps)
        trainer.metrics = MetricsSink(branch, Path(branch.output_dir), enabled=trainer.is_logger)
        trainer.train()
    finally:
        destroy()


if __name__ == "__main__":
    _reference(*json.loads(sys.argv[1]))

"""Multi-task curation: shards dealt to N tasks (Slurm array / datatrove), then the dedup stages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_data_prep_pipeline import differing_outputs, write_corpus

from kumihimo.core.configtree import ConfigError
from kumihimo.core.errors import UserError
from kumihimo.data_prep.config import load_config
from kumihimo.data_prep.curation import curate_task, finish_curation, prepare_run, task_shards
from kumihimo.data_prep.pipeline import curate
from kumihimo.data_prep.shards import plan_shards


@pytest.fixture(scope="module")
def single_task(tmp_path_factory):
    config = write_corpus(tmp_path_factory.mktemp("corpus"))
    curate(config)
    return config


def _copy(config, out: Path, **executor):
    new = dataclasses.replace(config, output_dir=str(out))
    new.executor = dataclasses.replace(config.executor, **executor)
    return new


def test_three_tasks_one_after_the_other_equal_the_single_task_run(single_task, tmp_path):
    config = _copy(single_task, tmp_path / "out")
    shards = plan_shards(config)
    assert len(shards) >= 4  # the corpus is split, so every task owns shards and near duplicates cross tasks
    assert sorted(s.index for i in range(3) for s in task_shards(shards, i, 3)) == list(range(len(shards)))
    prepare_run(config)
    curate_task(config, 1, 3)
    with pytest.raises(UserError, match="not curated yet"):
        finish_curation(config)
    curate_task(config, 0, 3)
    curate_task(config, 2, 3)
    result = finish_curation(config)
    assert differing_outputs(tmp_path / "out", Path(single_task.output_dir)) == []
    assert result.num_kept == 7 and result.dropped["dedup"] == {"exact_duplicate": 2, "near_duplicate": 1}


def test_datatrove_local_executor_equals_the_single_task_run(single_task, tmp_path):
    pytest.importorskip("datatrove")
    config = _copy(single_task, tmp_path / "out", kind="datatrove-local", tasks=3, workers=1)
    result = curate(config)
    assert differing_outputs(tmp_path / "out", Path(single_task.output_dir)) == []
    assert result.num_kept == 7
    assert (tmp_path / "out/work/datatrove/curate/completions").is_dir()
    assert curate(config).num_kept == 7  # a re-run finds every task complete


def test_datatrove_slurm_submits_an_array_and_a_dependent_dedup_job(single_task, tmp_path, monkeypatch):
    pytest.importorskip("datatrove")
    from kumihimo.data_prep import cluster

    config = _copy(
        single_task,
        tmp_path / "out",
        kind="datatrove-slurm",
        tasks=3,
        slurm_partition="cpu",
        slurm_sbatch_args=["account=proj"],
    )
    submitted = []
    monkeypatch.setattr(cluster.SlurmPipelineExecutor, "run", lambda self: submitted.append(self))
    assert curate(config) is None
    chain, stage = [], submitted[0]
    while stage is not None:
        chain.append(stage)
        stage = stage.depends
    chain.reverse()  # curate, the dedup stages, finish: each job depends on the one before
    # the label rounds are one task that runs them until settled, on its own pool of slurm_dedup_cpus
    assert [s.tasks for s in chain] == [3, 3, 1, 3, 1, 3, 3, 1, 1]
    assert isinstance(chain[0].pipeline[0], cluster.CurateShardsStep)
    stages = ["exact", "alive", "bands", "labels", "decide", "sizes", "cluster"]
    assert [s.pipeline[0].stage for s in chain[1:-1]] == stages
    labels = chain[4]
    assert labels.pipeline[0].workers == labels.cpus_per_task == config.executor.slurm_dedup_cpus
    assert len({s.logging_dir.path for s in chain}) == len(chain)  # completion markers kept apart
    assert isinstance(chain[-1].pipeline[0], cluster.FinishStep)
    directives = chain[0].get_sbatch_args(3)
    assert directives["partition"] == "cpu" and directives["account"] == "proj" and "qos" not in directives
    assert directives["array"] == "0-2"


def test_executor_config_is_checked():
    with pytest.raises(ConfigError, match="executor.slurm_partition"):
        load_config(None, ["input.sources=[{name: a, paths: [x]}]", "executor.kind=datatrove-slurm"])
    with pytest.raises(ConfigError, match="executor.tasks"):
        load_config(None, ["input.sources=[{name: a, paths: [x]}]", "executor.tasks=0"])

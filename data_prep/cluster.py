"""Curation on datatrove's executors: per-shard work as N tasks, then global dedup as one dependent task.

Stage 1 is `CurateShardsStep`: task `rank` of `world_size` curates shards rank, rank + world_size, ...
into `<out>/work/shards/` exactly as the local pool does (same per-shard directories, so any mix of
executors and re-runs resumes). Stage 2 is `FinishStep`, a single task that starts once every stage-1
task succeeded: it reads all shards' exact keys and MinHash signatures, so near duplicates are found
across tasks, then merges per source and writes the report. Locally the two stages run one after the
other (LocalPipelineExecutor, `depends=`); on Slurm, datatrove submits stage 1 as an array job and
stage 2 with `--dependency=afterok` on it, and this process returns at once.
"""

from __future__ import annotations

from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from data_prep.config import DataPrepConfig
from data_prep.pipeline import CurationResult, curate_task, finish_curation, prepare_run
from kumihimo.progress import say


class _ConfigStep(PipelineStep):
    """A datatrove step that runs part of kumihimo's pipeline for one DataPrepConfig."""

    type = "kumihimo"

    def __init__(self, config: DataPrepConfig):
        super().__init__()
        self.config = config


class CurateShardsStep(_ConfigStep):
    """Per-shard curation (read .. PII, dedup keys, signatures) of this task's share of the shards."""

    name = "kumihimo curate shards"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        num_shards = curate_task(self.config, rank, world_size)
        self.stat_update("shards", value=num_shards)


class FinishStep(_ConfigStep):
    """Global exact + fuzzy dedup over every shard, per-source merge and report (one task)."""

    name = "kumihimo dedup, merge, report"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        result = finish_curation(self.config)
        self.stat_update("kept", value=result.num_kept)
        self.stat_update("dropped", value=result.num_dropped)


def _slurm_executors(config: DataPrepConfig, logs: Path, num_tasks: int) -> SlurmPipelineExecutor:
    ex = config.executor
    sbatch_args = dict(arg.split("=", 1) for arg in ex.slurm_sbatch_args)
    # datatrove asks for qos=normal unless told otherwise, which clusters without that QOS reject
    common = {"time": ex.slurm_time, "partition": ex.slurm_partition, "mem_per_cpu_gb": ex.slurm_mem_per_cpu_gb,
              "env_command": ex.slurm_env_command, "qos": sbatch_args.pop("qos", ""), "sbatch_args": sbatch_args}
    shards = SlurmPipelineExecutor([CurateShardsStep(config)], tasks=num_tasks, workers=ex.workers or -1,
                                   cpus_per_task=ex.slurm_cpus_per_task, job_name="kumihimo-curate",
                                   logging_dir=str(logs / "curate"), **common)
    # the dedup task holds every signature in one memory map and the exact keys in RAM: give it a node's CPUs
    return SlurmPipelineExecutor([FinishStep(config)], tasks=1, cpus_per_task=max(ex.slurm_cpus_per_task, 4),
                                 job_name="kumihimo-dedup", logging_dir=str(logs / "finish"), depends=shards,
                                 **common)


def curate_with_datatrove(config: DataPrepConfig) -> CurationResult | None:
    """Run curation with executor.kind = datatrove-local (returns the result) or datatrove-slurm (submits
    the jobs and returns None; `kumihimo data curate` again after they finish prints the result)."""
    layout, shards = prepare_run(config)  # once, before any task: manifest and evaluation index
    logs = Path(config.executor.logging_dir or layout.work / "datatrove")
    num_tasks = max(1, min(config.executor.tasks, len(shards)))
    say(f"[data_prep] {len(shards)} shards in {num_tasks} datatrove tasks ({config.executor.kind}) -> {layout.out}")
    if config.executor.kind == "datatrove-slurm":
        _slurm_executors(config, logs, num_tasks).run()
        say(f"[data_prep] submitted; logs and completion markers under {logs}")
        return None
    workers = config.executor.workers or config.resolved_num_workers
    shards_stage = LocalPipelineExecutor([CurateShardsStep(config)], tasks=num_tasks, workers=min(workers, num_tasks),
                                         logging_dir=str(logs / "curate"), start_method="spawn")
    LocalPipelineExecutor([FinishStep(config)], tasks=1, workers=1, logging_dir=str(logs / "finish"),
                          depends=shards_stage, start_method="spawn").run()
    return finish_curation(config)  # already done by the last stage; this reads its outputs back

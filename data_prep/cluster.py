"""Curation on datatrove's executors: per-shard work as N tasks, the dedup stages, then one finishing task.

Stage 1 is `CurateShardsStep`: task `rank` of `world_size` curates shards rank, rank + world_size, ...
into `<out>/work/shards/` exactly as the local pool does (same per-shard directories, so any mix of
executors and re-runs resumes). Then `DedupStageStep` runs each dedup stage of dedup_stages.py (exact
key ranges, LSH band ranges and the clustering's owner ranges as executor.tasks tasks, the alive step
and the summary as one task), so near duplicates are found across tasks without one process reading
every signature or holding every pair. Last, `FinishStep` merges per source and writes the report.
Locally the stages run one after the other (LocalPipelineExecutor); on Slurm, datatrove submits each as
a job (an array for the multi-task ones) with `--dependency=afterok` on the one before, and this process
returns at once. The label rounds are one task either way (run_label_rounds): each round needs every
owner range of the round before and their number is known only when they settle, so the task runs
round after round, the owner ranges of a round on its own pool of processes (one range each at a time).
As separate jobs, every round would wait in the queue, and a fixed chain of them would have to guess
the count.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.data_prep.config import DataPrepConfig, ExecutorConfig
from kumihimo.data_prep.curation import (
    CurationResult,
    curate_task,
    dedup_plan,
    dedup_tasks,
    finish_curation,
    prepare_run,
    run_dedup_task,
    run_label_rounds,
)
from kumihimo.data_prep.dedup_stages import ONE_TASK_STAGES, STAGES
from kumihimo.data_prep.layout import RunLayout
from kumihimo.data_prep.shards import plan_shards

log = stage_logger("data_prep")


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


class DedupStageStep(_ConfigStep):
    """One dedup stage (dedup_stages.STAGES); task `rank` runs units rank, rank + world_size, ...; the
    label stage is one task that runs every round, on a pool of `workers` processes."""

    name = "kumihimo dedup stage"

    def __init__(self, config: DataPrepConfig, stage: str, workers: int = 1):
        super().__init__(config)
        self.stage = stage
        self.workers = workers

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        plan = dedup_plan(
            self.config,
            RunLayout(Path(self.config.output_dir)),
            plan_shards(self.config),
            dedup_tasks(self.config),
        )
        if self.stage == "labels":
            read = run_label_rounds(plan, self.workers)
        else:
            read = run_dedup_task(plan, self.stage, rank, world_size)
        self.stat_update("bytes_read", value=read)


def _stage_tasks(config: DataPrepConfig, stage: str) -> int:
    return 1 if stage in ONE_TASK_STAGES or stage == "labels" else dedup_tasks(config)


class FinishStep(_ConfigStep):
    """Per-source merge (each shard filtered by its dedup decision) and report (one task)."""

    name = "kumihimo dedup, merge, report"

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        result = finish_curation(self.config)
        self.stat_update("kept", value=result.num_kept)
        self.stat_update("dropped", value=result.num_dropped)


def _env_command(ex: ExecutorConfig) -> str:
    """What each job runs first so that `launch_pickled_pipeline` (and the Python and kumihimo beside it)
    is the one of this environment: a job starts with the submitting shell's PATH, which often lacks the
    venv (`.venv/bin/kumihimo` run without activating it) or holds another one."""
    if ex.slurm_env_command:
        return ex.slurm_env_command
    here = Path(sys.executable).parent
    found = shutil.which("launch_pickled_pipeline")
    bin_dir = here if (here / "launch_pickled_pipeline").is_file() else Path(found).parent if found else None
    if bin_dir is None:
        raise UserError(
            f"datatrove's launch_pickled_pipeline is neither beside {sys.executable} nor on PATH; "
            "set executor.slurm_env_command to the command that activates kumihimo's environment, "
            "e.g. 'executor.slurm_env_command=source /path/to/.venv/bin/activate'"
        )
    return f'export PATH={shlex.quote(str(bin_dir))}:"$PATH"'


def slurm_options(ex: ExecutorConfig) -> dict:
    """The SlurmPipelineExecutor arguments every kumihimo job shares (time, partition, memory,
    environment, sbatch options)."""
    sbatch_args = dict(arg.split("=", 1) for arg in ex.slurm_sbatch_args)
    # datatrove asks for qos=normal unless told otherwise, which clusters without that QOS reject
    return {
        "time": ex.slurm_time,
        "partition": ex.slurm_partition,
        "mem_per_cpu_gb": ex.slurm_mem_per_cpu_gb,
        "env_command": _env_command(ex),
        "qos": sbatch_args.pop("qos", ""),
        "sbatch_args": sbatch_args,
    }


def _slurm_executors(config: DataPrepConfig, logs: Path, num_tasks: int) -> SlurmPipelineExecutor:
    ex = config.executor
    common = slurm_options(ex)
    # an array task's pool is its own CPUs, not the node's (os.cpu_count() there counts every core)
    task_config = dataclasses.replace(config, num_workers=ex.slurm_cpus_per_task)
    shards = SlurmPipelineExecutor(
        [CurateShardsStep(task_config)],
        tasks=num_tasks,
        workers=ex.workers or -1,
        cpus_per_task=ex.slurm_cpus_per_task,
        job_name="kumihimo-curate",
        logging_dir=str(logs / "curate"),
        **common,
    )
    previous = shards
    for stage in STAGES:
        num_tasks = _stage_tasks(config, stage)
        previous = SlurmPipelineExecutor(
            [DedupStageStep(config, stage, workers=ex.slurm_dedup_cpus)],
            tasks=num_tasks,
            workers=ex.workers or -1,
            cpus_per_task=ex.slurm_cpus_per_task if num_tasks > 1 else ex.slurm_dedup_cpus,
            job_name=f"kumihimo-dedup-{stage}",
            logging_dir=str(logs / f"dedup-{stage}"),
            depends=previous,
            **common,
        )
    return SlurmPipelineExecutor(
        [FinishStep(config)],
        tasks=1,
        cpus_per_task=ex.slurm_dedup_cpus,
        job_name="kumihimo-finish",
        logging_dir=str(logs / "finish"),
        depends=previous,
        **common,
    )


def jobs_in_queue(record: Path) -> list[str]:
    """squeue lines of the jobs a previous submission recorded that are still pending or running."""
    if not record.is_file():
        return []
    job_ids = json.loads(record.read_text(encoding="utf-8"))
    if not job_ids:
        return []
    try:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i %j %T %r", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(
            f"cannot ask Slurm whether jobs {job_ids} are still queued (squeue: {exc}); "
            f"run this on a node with the Slurm commands, or delete {record}"
        ) from exc
    return proc.stdout.splitlines() if proc.returncode == 0 else []  # ids Slurm forgot: not queued


def _submit_or_collect(
    config: DataPrepConfig, logs: Path, num_tasks: int, num_shards: int
) -> CurationResult | None:
    record = logs / "slurm_jobs.json"
    queued = jobs_in_queue(record)
    if queued:
        # a second submission would curate the same shards twice at once
        raise UserError(
            f"the jobs of the previous submission are still in the Slurm queue ({'; '.join(queued)}); "
            "wait for them to end, or scancel them (jobs left pending with "
            "DependencyNeverSatisfied after a failed task), then run this command again"
        )
    finish = _slurm_executors(config, logs, num_tasks)
    if not finish.get_incomplete_ranks():
        log.info(f"the Slurm jobs have completed (markers under {logs}); reading their result")
        return finish_curation(config)
    log.info(
        f"{num_shards} shards in {num_tasks} Slurm array tasks, then the dedup stages' jobs and the finishing job -> {config.output_dir}"
    )
    chain, stage = [], finish
    while stage is not None:  # finish, the dedup stages, the curation array (run() forgets `depends`)
        chain.append(stage)
        stage = stage.depends
    finish.run()
    job_ids = [str(s.job_id) for s in reversed(chain) if s.job_id not in (None, -1)]
    configtree.write_text_atomic(record, json.dumps(job_ids))
    log.info(f"submitted jobs {', '.join(job_ids)}; logs and completion markers under {logs}")
    return None


def curate_with_datatrove(config: DataPrepConfig) -> CurationResult | None:
    """Run curation with executor.kind = datatrove-local (returns the result) or datatrove-slurm: submit
    the jobs that are not complete yet and return None, or, once the finishing job has completed, read the
    result back and return it (so `kumihimo data curate` run again after the jobs prints the result)."""
    layout, shards = prepare_run(config)  # once, before any task: manifest and evaluation index
    logs = Path(config.executor.logging_dir or layout.work / "datatrove").absolute()
    num_tasks = max(1, min(config.executor.tasks, len(shards)))
    if config.executor.kind == "datatrove-slurm":
        return _submit_or_collect(config, logs, num_tasks, len(shards))
    log.info(f"{len(shards)} shards in {num_tasks} datatrove tasks ({config.executor.kind}) -> {layout.out}")
    workers = config.executor.workers or config.resolved_num_workers
    # `workers` tasks run side by side, each curating its shards one at a time
    task_config = dataclasses.replace(config, num_workers=1)
    shards_stage = LocalPipelineExecutor(
        [CurateShardsStep(task_config)],
        tasks=num_tasks,
        workers=min(workers, num_tasks),
        logging_dir=str(logs / "curate"),
        start_method="spawn",
    )
    shards_stage.run()
    # one stage after the other, here
    for stage in STAGES:
        num_tasks = _stage_tasks(config, stage)
        LocalPipelineExecutor(
            [DedupStageStep(config, stage, workers=workers)],
            tasks=num_tasks,
            workers=min(workers, num_tasks),
            logging_dir=str(logs / f"dedup-{stage}"),
            start_method="spawn",
        ).run()
    LocalPipelineExecutor(
        [FinishStep(config)],
        tasks=1,
        workers=1,
        logging_dir=str(logs / "finish"),
        start_method="spawn",
    ).run()
    return finish_curation(config)  # already done by the last stage; this reads its outputs back

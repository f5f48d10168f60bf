"""`kumihimo data tokenize` as N tasks: curated files cut into parts, one .bin/.idx per part, then a merge
that writes the bytes one writer would have written.

With `tokenize.tasks` unset the datasets are written by one writer per source (tokenize_stage). With N
tasks, under `<out>/work/tokenize/parts/<source>/`:

  plan.json                  the source's marker (curated file, tokenizer, settings) and its parts' byte
                             spans: `tokenize.part_bytes` of the curated JSONL each, cut at line starts
  000003/                    a finished part: datasets/<group>_text_document.{bin,idx} and counts.json
  .000003.tmp-kumihimo-*/    a part being written; renamed to 000003/ only when complete

The launcher writes the plans (a plan made for another curated file, tokenizer or settings is removed
with its parts); task r of N encodes parts r, r+N, ... of every source's parts in order, skipping the
finished ones, so a killed task redoes only its own unfinished parts; the merge concatenates each
source's parts in order into datasets/ (`indexed.concatenate_datasets`: the bytes of one writer, and of
Megatron-LM's merge_datasets.py), writes the source's marker as the single writer does, removes the
parts, then writes blend.yaml and the report. The tasks run on `executor.kind`: a local process pool,
datatrove's LocalPipelineExecutor, or a Slurm array job with the merge as a job that depends on it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from kumihimo.core.configtree import write_text_atomic
from kumihimo.core.errors import UserError
from kumihimo.core.files import TEMP_MARK, temp_dir
from kumihimo.core.logs import stage_logger
from kumihimo.core.processes import RunLock
from kumihimo.core.progress import Progress
from kumihimo.data_prep import blend_groups
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.executor import process_pool, run_unordered
from kumihimo.data_prep.indexed import concatenate_datasets
from kumihimo.data_prep.layout import OUTPUT_FOLDERS
from kumihimo.data_prep.tokenize_stage import (
    BuildResult,
    GroupWriters,
    build_datasets,
    build_datasets_unlocked,
    checked_settings,
    curated_path,
    dataset_prefix,
    encode_source,
    encoders,
    finished_counts,
    finished_marker,
    marker_path,
    source_marker,
)
from kumihimo.tokenizer.base import load_tokenizer

log = stage_logger("tokenize")

PLAN = "plan.json"
COUNTS = "counts.json"


def parts_root(out: Path) -> Path:
    return out / "work" / "tokenize" / "parts"


def part_name(index: int) -> str:
    """Zero-padded, so that the parts sort in order (as Megatron-LM's merge_datasets.py takes them)."""
    return f"{index:06d}"


def plan_spans(path: Path, part_bytes: int) -> list[tuple[int, int]]:
    """Byte spans of `path` of about `part_bytes` each, every one starting at a line start; one span even
    for an empty file (its source still gets its, empty, dataset)."""
    size = path.stat().st_size
    starts = [0]
    with open(path, "rb") as handle:
        for cut in range(part_bytes, size, part_bytes):
            if cut <= starts[-1]:  # a line longer than part_bytes reached past this cut
                continue
            handle.seek(cut - 1)
            handle.readline()  # to the end of the line holding byte cut-1: the next line starts at or after cut
            if handle.tell() < size:
                starts.append(handle.tell())
    return list(zip(starts, [*starts[1:], size], strict=True))


def prepare_parts(config: DataPrepConfig, tokenizer: Any) -> list[str]:
    """Write (or keep) the plan of every source whose datasets are not complete yet; returns their names.
    A plan made for another curated file, tokenizer or settings is removed with its parts, and the parts
    left by a source that has been merged since are removed."""
    out = Path(config.output_dir)
    todo = []
    for source in config.input.sources:
        curated = curated_path(out, source.name)
        grouping = blend_groups.source_grouping(config, source.name)
        wanted = source_marker(curated, tokenizer, config, grouping)
        folder = parts_root(out) / source.name
        if finished_counts(out, source.name, wanted) is not None:
            shutil.rmtree(folder, ignore_errors=True)  # a merge killed after its marker, before the cleanup
            continue
        plan = {"marker": wanted, "part_bytes": config.tokenize.part_bytes}
        previous = _read_plan(out, source.name)
        if previous is None or {k: previous.get(k) for k in plan} != plan:
            shutil.rmtree(folder, ignore_errors=True)  # parts of other settings (only kumihimo writes here)
            folder.mkdir(parents=True)
            plan["spans"] = plan_spans(curated, config.tokenize.part_bytes)
            write_text_atomic(folder / PLAN, json.dumps(plan))
        todo.append(source.name)
    if not todo and parts_root(out).is_dir() and not any(parts_root(out).iterdir()):
        parts_root(out).rmdir()
    return todo


def _read_plan(out: Path, source: str) -> dict[str, Any] | None:
    path = parts_root(out) / source / PLAN
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _planned_parts(config: DataPrepConfig) -> list[tuple[str, int, tuple[int, int]]]:
    """(source, part index, span) of every planned part, sources in config order: the list tasks share."""
    out = Path(config.output_dir)
    parts = []
    for source in config.input.sources:
        plan = _read_plan(out, source.name)
        if plan is not None:
            parts += [(source.name, i, (start, end)) for i, (start, end) in enumerate(plan["spans"])]
    return parts


def tokenize_task(config: DataPrepConfig, tokenizer_path: str, rank: int, world_size: int) -> int:
    """Encode the unfinished parts of task `rank` of `world_size` (parts rank, rank + world_size, ...);
    returns how many it encoded. `config` is as `checked_settings` returns it; the plans exist."""
    if not 0 <= rank < world_size:
        raise UserError(f"task index {rank} is outside 0..{world_size - 1}")
    out = Path(config.output_dir)
    mine = _planned_parts(config)[rank::world_size]
    todo = [(s, i, span) for s, i, span in mine if not (parts_root(out) / s / part_name(i)).is_dir()]
    if not todo:
        return 0
    vocab_size = load_tokenizer(tokenizer_path).vocab_size
    with (
        Progress(f"tokenize task {rank}/{world_size}", len(todo), "parts") as progress,
        encoders(tokenizer_path, config.resolved_num_workers) as pool,
    ):
        for source, index, span in todo:
            _encode_part(config, pool, vocab_size, source, index, span)
            progress.update()
    return len(todo)


def _encode_part(
    config: DataPrepConfig,
    pool: ProcessPoolExecutor | None,
    vocab_size: int,
    source: str,
    index: int,
    span: tuple[int, int],
) -> None:
    out = Path(config.output_dir)
    folder = parts_root(out) / source
    for stale in folder.glob(f".{part_name(index)}{TEMP_MARK}*"):  # this part's, left by a killed task
        shutil.rmtree(stale, ignore_errors=True)
    curated = curated_path(out, source)
    plan = _read_plan(out, source)
    assert plan is not None, f"no plan for {source}"
    stat = curated.stat()
    if [stat.st_size, stat.st_mtime_ns] != [
        plan["marker"]["curated_size"],
        plan["marker"]["curated_mtime_ns"],
    ]:
        raise UserError(
            f"{curated} changed since the tokenize tasks were planned; run `kumihimo data tokenize` again"
        )
    staging = temp_dir(folder, f".{part_name(index)}{TEMP_MARK}")
    try:
        writers = GroupWriters(staging, blend_groups.source_grouping(config, source), vocab_size)
        try:
            progress = Progress(f"tokenize {source} part {index}", None, "documents", interval=60.0)
            encode_source(curated, writers, config, pool, config.resolved_num_workers, progress, span)
            writers.finish()
        except BaseException:
            writers.abort()
            raise
        counts = {"counts": writers.counts(), "num_left_out": writers.num_left_out}
        write_text_atomic(staging / COUNTS, json.dumps(counts))
        staging.rename(folder / part_name(index))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def merge_parts(config: DataPrepConfig, tokenizer_path: str | Path) -> BuildResult:
    """Concatenate every planned source's parts into its datasets, then write blend.yaml and the report
    (as the single writer does); refuses, in one line, while a part is missing."""
    out = Path(config.output_dir)
    config, _ = checked_settings(config, tokenizer_path)
    for source in config.input.sources:
        plan = _read_plan(out, source.name)
        if plan is not None:
            _merge_source(config, source.name, plan)
    if parts_root(out).is_dir() and not any(parts_root(out).iterdir()):
        parts_root(out).rmdir()
    return build_datasets_unlocked(config, tokenizer_path)


def _merge_source(config: DataPrepConfig, source: str, plan: dict[str, Any]) -> None:
    out = Path(config.output_dir)
    folder = parts_root(out) / source
    parts = [folder / part_name(i) for i in range(len(plan["spans"]))]
    missing = [p.name for p in parts if not p.is_dir()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(parts)} parts of source {source} are not tokenized yet (first: "
            f"{folder / missing[0]}); run the tokenize tasks again (`kumihimo data tokenize` resumes them)"
        )
    part_counts = [json.loads((p / COUNTS).read_text(encoding="utf-8")) for p in parts]
    grouping = blend_groups.source_grouping(config, source)
    counts: dict[str, list[int]] = {}
    for group in grouping.groups:
        holding = [p for p, c in zip(parts, part_counts, strict=True) if group.name in c["counts"]]
        if holding:  # a group no part holds has no dataset, as with one writer
            target = dataset_prefix(out, group.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            num_tokens, num_documents = concatenate_datasets(
                [dataset_prefix(p, group.name) for p in holding], target
            )
            counts[group.name] = [num_tokens, num_documents]
    num_left_out = sum(c["num_left_out"] for c in part_counts)
    marker = finished_marker(plan["marker"], grouping, counts, num_left_out)
    write_text_atomic(marker_path(out, source), json.dumps(marker))
    shutil.rmtree(folder)  # the parts are a copy of the datasets now
    log.info(f"{source}: merged {len(parts)} parts ({marker['num_tokens']} tokens)")


@dataclasses.dataclass(frozen=True, repr=False)
class TokenizeTask:
    """Pipeline step (datatrove's `(data, rank, world_size)` shape): task `rank` encodes its parts."""

    config: DataPrepConfig
    tokenizer_path: str

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        yield from data or ()
        tokenize_task(self.config, self.tokenizer_path, rank, world_size)

    def __repr__(self) -> str:  # datatrove logs the pipeline: the output folder, not the whole config
        return f"kumihimo tokenize parts of {self.config.output_dir}"


@dataclasses.dataclass(frozen=True, repr=False)
class MergeTask:
    """Pipeline step, one task: merge every source's parts, write blend.yaml and the report."""

    config: DataPrepConfig
    tokenizer_path: str

    def __call__(self, data=None, rank: int = 0, world_size: int = 1):
        yield from data or ()
        merge_parts(self.config, self.tokenizer_path)

    def __repr__(self) -> str:
        return f"kumihimo merge tokenized parts into {self.config.output_dir}/datasets"


def _run_task(task: tuple[DataPrepConfig, str, int, int]) -> int:
    return tokenize_task(*task)


def _no_setup() -> None:
    pass


def tokenize(config: DataPrepConfig, tokenizer_path: str | Path) -> BuildResult | None:
    """`kumihimo data tokenize`: one writer per source (tokenize.tasks unset), or tokenize.tasks tasks on
    executor.kind then the merge. With datatrove-slurm the jobs are submitted and None is returned;
    the same call after they have finished returns the result."""
    num_tasks = config.tokenize.tasks
    if num_tasks is None:
        return build_datasets(config, tokenizer_path)
    tokenizer_path = str(tokenizer_path)
    if config.executor.kind == "datatrove-slurm":
        # no RunLock here: taking it removes temporary files, which would be those of array tasks still
        # running; the queue check refuses a second submission instead (as `data curate` on Slurm)
        config, tokenizer = checked_settings(config, tokenizer_path)
        return _submit_or_collect(config, tokenizer, tokenizer_path, num_tasks)
    with RunLock(config.output_dir, "tokenize", OUTPUT_FOLDERS):  # one live run; clears a killed one's debris
        config, tokenizer = checked_settings(config, tokenizer_path)
        todo = prepare_parts(config, tokenizer)
        if todo:
            num_parts = len(_planned_parts(config))
            log.info(
                f"{num_parts} parts of {len(todo)} sources in {num_tasks} tasks ({config.executor.kind})"
            )
            _run_locally(config, tokenizer_path, num_tasks)
        return merge_parts(config, tokenizer_path)


def _run_locally(config: DataPrepConfig, tokenizer_path: str, num_tasks: int) -> None:
    """The tasks on this machine, side by side, each encoding its parts in one process."""
    task_config = dataclasses.replace(config, num_workers=1)
    if config.executor.kind == "datatrove-local":
        LocalPipelineExecutor = _datatrove_executor("LocalPipelineExecutor", config)
        workers = min(config.executor.workers or config.resolved_num_workers, num_tasks)
        logs = Path(config.executor.logging_dir or Path(config.output_dir) / "work" / "datatrove")
        LocalPipelineExecutor(
            [TokenizeTask(task_config, tokenizer_path)],
            tasks=num_tasks,
            workers=workers,
            logging_dir=str(logs.absolute() / "tokenize"),
            skip_completed=False,  # the parts say what is done: a plan for other settings starts over
            start_method="spawn",
        ).run()
        return
    workers = min(config.resolved_num_workers, num_tasks)
    if workers == 1:
        for rank in range(num_tasks):
            tokenize_task(task_config, tokenizer_path, rank, num_tasks)
        return
    with process_pool(workers, _no_setup, ()) as pool:
        tasks = [(task_config, tokenizer_path, rank, num_tasks) for rank in range(num_tasks)]
        for _ in run_unordered(pool, _run_task, tasks):
            pass


def _datatrove_executor(name: str, config: DataPrepConfig) -> Any:
    """datatrove's executor class `name`; datatrove is optional (the `cluster` extra): a one-line error."""
    try:
        import datatrove.executor
    except ImportError as exc:
        raise UserError(
            f"executor.kind={config.executor.kind} needs datatrove ({exc}); run `pip install datatrove` "
            "or use executor.kind=local"
        ) from exc
    return getattr(datatrove.executor, name)


def _submit_or_collect(
    config: DataPrepConfig, tokenizer: Any, tokenizer_path: str, num_tasks: int
) -> BuildResult | None:
    SlurmPipelineExecutor = _datatrove_executor("SlurmPipelineExecutor", config)
    from kumihimo.data_prep.cluster import jobs_in_queue, slurm_options

    ex = config.executor
    logs = Path(ex.logging_dir or Path(config.output_dir) / "work" / "datatrove").absolute() / "tokenize"
    record = logs / "slurm_jobs.json"
    queued = jobs_in_queue(record)
    if queued:
        raise UserError(
            f"the tokenize jobs of the previous submission are still in the Slurm queue ({'; '.join(queued)}); "
            "wait for them to end, or scancel them, then run this command again"
        )
    if not prepare_parts(config, tokenizer):
        log.info("every source is merged; writing blend.yaml and the report")
        return build_datasets_unlocked(config, tokenizer_path)
    common = slurm_options(ex)
    # an array task's pool is its own CPUs, not the node's (os.cpu_count() there counts every core)
    tasks = SlurmPipelineExecutor(
        [TokenizeTask(dataclasses.replace(config, num_workers=ex.slurm_cpus_per_task), tokenizer_path)],
        tasks=num_tasks,
        workers=ex.workers or -1,
        cpus_per_task=ex.slurm_cpus_per_task,
        job_name="kumihimo-tokenize",
        logging_dir=str(logs / "tasks"),
        skip_completed=False,
        **common,
    )
    merge = SlurmPipelineExecutor(
        [MergeTask(config, tokenizer_path)],
        tasks=1,
        cpus_per_task=1,
        job_name="kumihimo-tokenize-merge",
        logging_dir=str(logs / "merge"),
        depends=tasks,
        skip_completed=False,
        **common,
    )
    merge.run()
    job_ids = [str(j) for j in (tasks.job_id, merge.job_id) if j not in (None, -1)]
    write_text_atomic(record, json.dumps(job_ids))
    log.info(f"submitted jobs {', '.join(job_ids)}; when they have finished, run this command again")
    return None

"""The phases of curation (raw JSONL -> curated JSONL), each resumable, run under `<out>/work/`:
  1. shards/    one directory per input shard, in parallel (read .. PII, exact keys, MinHash signatures)
  2. dedup/     exact and fuzzy dedup as stages of independent units (dedup_stages.py): per key range,
                merge the shards' sorted runs into exact groups and LSH candidate pairs; cluster the
                pairs; one decision file per shard
  3. merged/    per source: curated/, dropped/, quarantine/ JSONL assembled in input order
Each unit is written under a temporary name and renamed when complete, so a killed run picks up at
the first unfinished unit. Stage order: decontamination runs before dedup so that a contaminated
document can never be the copy that removes its clean near-duplicates; PII redaction runs before
dedup so documents that differ only in e-mail addresses or phone numbers count as copies.

The local pool and datatrove's executors (data_prep/cluster.py) both run these phases;
data_prep/pipeline.py picks one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.files import TEMP_MARK, make_output_folder
from kumihimo.core.logs import stage_logger
from kumihimo.core.progress import Progress
from kumihimo.core.records import file_format
from kumihimo.data_prep import dedup_stages, scoring, shard_stage
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.decontam import build_eval_index, save_eval_index
from kumihimo.data_prep.documents import Shard
from kumihimo.data_prep.executor import process_pool, run_unordered
from kumihimo.data_prep.jsonl_io import AtomicJsonlWriter
from kumihimo.data_prep.layout import CURATION_SECTIONS, RunLayout
from kumihimo.data_prep.minhash import KEEP, QUALITY_DROPPED
from kumihimo.data_prep.quality import QualityFilter
from kumihimo.data_prep.refilter import quality_drop, quality_passes
from kumihimo.data_prep.report import KeptStats, build_report, write_report
from kumihimo.data_prep.shards import plan_shards

log = stage_logger("data_prep")
dedup_log = stage_logger("dedup")


@dataclass
class CurationResult:
    """What a finished curation produced: its folders and the counts of report.json."""

    output_dir: Path
    curated_paths: dict[str, Path]
    num_input_lines: int
    num_kept: int
    num_dropped: int
    num_quarantined: int
    dropped: dict[str, dict[str, int]]  # stage -> reason -> count
    quarantined: dict[str, int]  # reason -> count
    report_path: Path
    pii: dict[str, int] = field(default_factory=dict)


def run_fingerprint(config: DataPrepConfig, shards: list[Shard]) -> dict[str, Any]:
    sections = {name: configtree.to_dict(getattr(config, name)) for name in CURATION_SECTIONS}
    if "input" in sections and not any(file_format(s.path) == "warc" for s in shards):
        # WARC settings change nothing for other inputs: editing them must not block a resume
        sections["input"].pop("warc", None)
    if not config.dedup.record_cluster_size:  # added later: runs curated before it still resume
        sections["dedup"].pop("record_cluster_size", None)
    if config.score.active:  # absent without scorers, so runs made before the score stage still resume
        sections["score"] = {
            "config": configtree.to_dict(config.score),
            "models": scoring.fingerprint(config.score),
        }
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()
    files = sorted({s.path for s in shards})
    inputs = [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]
    return {"config_sha256": digest, "inputs": inputs, "num_shards": len(shards)}


def _check_or_record_run(layout: RunLayout, config: DataPrepConfig, shards: list[Shard]) -> None:
    manifest = layout.work / "run.json"
    current = run_fingerprint(config, shards)
    if manifest.is_file():
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous != current:
            what = (
                "a different curation config"
                if previous.get("config_sha256") != current["config_sha256"]
                else "different input files"
            )
            raise UserError(
                f"output_dir={str(layout.out)!r} holds an unfinished or finished run with "
                f"{what}; choose a new output_dir or delete {layout.work} to start over"
            )
        return
    configtree.write_text_atomic(manifest, json.dumps(current, indent=1))
    configtree.save(config, layout.out / "data_prep_config.yaml")


# ---- phase 1: shards ------------------------------------------------------------------------------

_WORKER_TOOLS: shard_stage.StageTools | None = None


def _init_worker(config: DataPrepConfig, eval_index_path: Path) -> None:
    global _WORKER_TOOLS
    _WORKER_TOOLS = shard_stage.build_tools(config, eval_index_path)


def _run_shard(task: tuple[Shard, Path]) -> int:
    shard, shards_dir = task
    assert _WORKER_TOOLS is not None, "worker not initialised"
    shard_stage.process_shard(shard, _WORKER_TOOLS, shards_dir)
    return shard.index


def curate_shards(config: DataPrepConfig, layout: RunLayout, shards: list[Shard]) -> None:
    layout.shards.mkdir(parents=True, exist_ok=True)
    for shard in shards:  # left by a killed run; only this task's shards (others may be in progress)
        for stale in layout.shards.glob(f".{shard.shard_id}{TEMP_MARK}*"):
            shutil.rmtree(stale, ignore_errors=True)
    todo = [s for s in shards if not (layout.shards / s.shard_id).is_dir()]
    for shard in shards:
        if shard not in todo:  # curated before the sorted runs existed: add them (this task owns it)
            dedup_stages.add_missing_runs(layout.shards / shard.shard_id, config.dedup)
    if len(todo) < len(shards):
        log.info(f"resuming: {len(shards) - len(todo)} of {len(shards)} shards already done")
    if not todo:
        return
    num_workers = min(config.resolved_num_workers, len(todo))
    with Progress("curate", len(todo), "shards") as progress:
        if num_workers == 1:
            _init_worker(config, layout.eval_index)
            for shard in todo:
                _run_shard((shard, layout.shards))
                progress.update()
            return
        with process_pool(num_workers, _init_worker, (config, layout.eval_index)) as pool:
            for _ in run_unordered(pool, _run_shard, [(s, layout.shards) for s in todo]):
                progress.update()


# ---- phase 2: dedup stages ------------------------------------------------------------------------


def dedup_plan(
    config: DataPrepConfig, layout: RunLayout, shards: list[Shard], num_tasks: int
) -> dedup_stages.DedupPlan:
    """The dedup stages' plan for this run: the same in every task of every executor."""
    dirs = tuple(layout.shards / s.shard_id for s in shards)
    return dedup_stages.DedupPlan(
        config=config,
        shard_dirs=dirs,
        folder=layout.dedup_folder,
        num_tasks=num_tasks,
    )


def run_dedup_unit(plan: dedup_stages.DedupPlan, stage: str, unit: Any) -> int:
    """One unit of a dedup stage; the alive stage gets a refilter run's quality verdicts from here."""
    passes = None
    if stage == "alive" and plan.config.filters.refilterable and not plan.alive_path.is_file():
        passes = quality_passes(plan.config, [d / shard_stage.CANDIDATES for d in plan.shard_dirs])
    return dedup_stages.run_unit(plan, stage, unit, passes)


def run_dedup_task(plan: dedup_stages.DedupPlan, stage: str, rank: int, world_size: int) -> int:
    """Task `rank` of `world_size` of a dedup stage (a datatrove task); returns the bytes it read."""
    units = dedup_stages.stage_units(plan, stage)[rank::world_size]
    return sum(run_dedup_unit(plan, stage, unit) for unit in units)


def _dedup_unit(task: tuple[dedup_stages.DedupPlan, str, Any]) -> int:
    return run_dedup_unit(*task)


def _run_dedup_stages(config: DataPrepConfig, plan: dedup_stages.DedupPlan) -> None:
    """Every dedup stage here, its units on a process pool; units already done are skipped."""
    if plan.summary_path.is_file():
        return
    num_workers = config.resolved_num_workers
    dedup_log.info(f"{len(plan.shard_dirs)} shards, {plan.num_tasks} key ranges, {num_workers} workers")
    with _LazyPool(num_workers) as pool:
        for stage in dedup_stages.STAGES:
            _run_stage_here(plan, stage, pool)


def run_label_rounds(plan: dedup_stages.DedupPlan, num_workers: int) -> int:
    """The label rounds until the labels settle, each round's owner ranges on a pool of `num_workers`
    processes (each holds one range at a time): how the datatrove executors run the clustering, as one
    task, since a round needs every range of the round before (no queue wait between rounds). Returns
    the bytes read."""
    with _LazyPool(num_workers) as pool:
        read = _run_stage_here(plan, "labels", pool)
    dedup_stages.final_round(plan)  # fails here, in the label task, if the rounds stopped unsettled
    return read


class _LazyPool(contextlib.ExitStack):
    """A process pool of `num_workers` opened when first needed (one-unit stages run in this process)
    and closed on leaving the `with`."""

    def __init__(self, num_workers: int):
        super().__init__()
        self.num_workers = num_workers
        self._pool = None

    def get(self):
        if self._pool is None:
            self._pool = self.enter_context(process_pool(self.num_workers, _no_setup, ()))
        return self._pool


def _run_stage_here(plan: dedup_stages.DedupPlan, stage: str, pool: _LazyPool) -> int:
    """The units of one stage ("labels": once per round, until settled) here or on the pool; returns
    the bytes they read."""
    read = 0
    for _ in dedup_stages.stage_runs(plan, stage):
        units = dedup_stages.stage_units(plan, stage)
        if pool.num_workers == 1 or len(units) == 1:
            read += sum(run_dedup_unit(plan, stage, unit) for unit in units)
        else:
            read += sum(run_unordered(pool.get(), _dedup_unit, [(plan, stage, unit) for unit in units]))
    return read


def _no_setup() -> None:
    pass


# ---- phase 3: per-source merge --------------------------------------------------------------------


def _kept_ids(
    layout: RunLayout, shards: list[Shard], offsets: np.ndarray, targets: np.ndarray
) -> dict[int, str]:
    """Document ids of the kept copies that dropped duplicates point at."""
    wanted = set(targets.tolist())
    found: dict[int, str] = {}
    for shard, start, end in zip(shards, offsets[:-1], offsets[1:]):
        if not any(start <= t < end for t in wanted) or start == end:
            continue
        with open(layout.shards / shard.shard_id / shard_stage.IDS, encoding="utf-8") as handle:
            for row, line in enumerate(handle):
                if start + row in wanted:
                    found[start + row] = json.loads(line)
    return found


def _merge_source(
    source: str,
    config: DataPrepConfig,
    layout: RunLayout,
    shards: list[Shard],
    plan: dedup_stages.DedupPlan,
    kept_ids: dict[int, str],
    record_cluster_size: bool,
) -> dict[str, Any]:
    """The filter step per shard: each shard's decision file says which of its rows are kept."""
    offsets = plan.offsets()
    kept = KeptStats()
    dedup_drops: dict[str, int] = {}
    quality_drops: dict[str, int] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    excerpt = config.report.excerpt_chars
    quality = QualityFilter(config.filters) if config.filters.refilterable else None
    with (
        AtomicJsonlWriter(layout.curated(source)) as curated,
        AtomicJsonlWriter(layout.dropped(source)) as dropped,
        AtomicJsonlWriter(layout.quarantine(source)) as quarantine,
    ):
        for shard in shards:
            if shard.source != source:
                continue
            shard_dir = layout.shards / shard.shard_id
            for name, writer in ((shard_stage.DROPPED, dropped), (shard_stage.QUARANTINE, quarantine)):
                with open(shard_dir / name, encoding="utf-8") as handle:
                    for line in handle:
                        writer.write_line(line)
            num_rows = int(offsets[shard.index + 1] - offsets[shard.index])
            decision = dedup_stages.load_shard_decision(plan, shard_dir, num_rows)
            with open(shard_dir / shard_stage.CANDIDATES, encoding="utf-8") as handle:
                for row, line in enumerate(handle):
                    target = int(decision.duplicate_of[row])
                    record = json.loads(line)
                    if target == KEEP:
                        if not record_cluster_size:
                            curated.write_line(line)
                        else:
                            record.setdefault("attributes", {})["cluster_size"] = int(
                                decision.cluster_size[row]
                            )
                            curated.write(record)
                        kept.add(record)
                        continue
                    if target == QUALITY_DROPPED:
                        drop = quality_drop(quality, record, excerpt, config.score)
                        dropped.write(drop)
                        quality_drops[drop["reason"]] = quality_drops.get(drop["reason"], 0) + 1
                        bucket = examples.setdefault(f"quality/{drop['reason']}", [])
                        if len(bucket) < config.report.examples_per_reason:
                            bucket.append({k: v for k, v in drop.items() if k != "attributes"})
                        continue
                    reason = "exact_duplicate" if decision.is_exact[row] else "near_duplicate"
                    drop = {
                        "id": record["id"],
                        "source": source,
                        "file": record["meta"]["file"],
                        "line": record["meta"]["line"],
                        "stage": "dedup",
                        "reason": reason,
                        "detail": f"duplicate of {kept_ids.get(target, '?')}",
                        "lang": record["lang"],
                        "excerpt": record["text"][:excerpt],
                    }
                    dropped.write(drop)
                    dedup_drops[reason] = dedup_drops.get(reason, 0) + 1
                    bucket = examples.setdefault(f"dedup/{reason}", [])
                    if len(bucket) < config.report.examples_per_reason:
                        bucket.append(drop)
    summary = {"kept": kept.to_json(), "dedup_dropped": dedup_drops, "examples": examples}
    if quality_drops:
        summary["quality_dropped"] = quality_drops
    configtree.write_text_atomic(layout.merged_marker(source), json.dumps(summary, ensure_ascii=False))
    return summary


def _merge_all(config: DataPrepConfig, layout: RunLayout, shards: list[Shard]) -> dict[str, dict[str, Any]]:
    # the merge reads each shard's decision file, whatever the number of tasks that made it
    plan = dedup_plan(config, layout, shards, num_tasks=1)
    summaries: dict[str, dict[str, Any]] = {}
    todo = [
        s.name
        for s in config.input.sources
        if not layout.merged_marker(s.name).is_file() or not layout.curated(s.name).is_file()
    ]
    targets = dedup_stages.removed_targets(plan) if todo else np.empty(0, np.int64)
    kept_ids = _kept_ids(layout, shards, plan.offsets(), targets) if len(targets) else {}
    for source in config.input.sources:
        if source.name in todo:
            summaries[source.name] = _merge_source(
                source.name, config, layout, shards, plan, kept_ids, config.dedup.record_cluster_size
            )
        else:
            summaries[source.name] = json.loads(layout.merged_marker(source.name).read_text(encoding="utf-8"))
    return summaries


def dedup_tasks(config: DataPrepConfig) -> int:
    """Key ranges the exact stage cuts the key space into (and band x range units of the fuzzy stage):
    executor.tasks for every executor, so a run resumed under another executor reuses finished units."""
    return config.executor.tasks


def prepare_run(config: DataPrepConfig) -> tuple[RunLayout, list[Shard]]:
    """Plan the shards, record (or check) the run manifest and build the evaluation index; idempotent."""
    layout = RunLayout(make_output_folder(config.output_dir))
    shards = plan_shards(config)
    scoring.check_scorers(config.score)  # a missing or corrupt model stops the run before any work
    layout.work.mkdir(parents=True, exist_ok=True)
    _check_or_record_run(layout, config, shards)
    if not layout.eval_index.is_file():
        save_eval_index(build_eval_index(config.decontam), layout.eval_index)
    return layout, shards


def task_shards(shards: list[Shard], task_index: int, num_tasks: int) -> list[Shard]:
    """The shards task `task_index` of `num_tasks` curates: every num_tasks-th, so sizes stay balanced."""
    if not 0 <= task_index < num_tasks:
        raise UserError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    return shards[task_index::num_tasks]


def curate_task(config: DataPrepConfig, task_index: int, num_tasks: int) -> int:
    """Phase 1 for one task of a multi-task run (a Slurm array element, a datatrove task); returns the
    number of shards it owns. Needs `prepare_run` to have run once; the shard plan is recomputed here
    and is the same in every task (sorted globs, fixed sizes)."""
    layout = RunLayout(Path(config.output_dir))
    shards = plan_shards(config)
    _check_or_record_run(layout, config, shards)
    mine = task_shards(shards, task_index, num_tasks)
    curate_shards(config, layout, mine)
    return len(mine)


def finish_curation(config: DataPrepConfig) -> CurationResult:
    """Phases 2 and 3 (the dedup stages not done yet, per-source merge) and the report; refuses to start
    while a shard is missing."""
    layout = RunLayout(Path(config.output_dir))
    shards = plan_shards(config)
    _check_or_record_run(layout, config, shards)
    missing = [s.shard_id for s in shards if not (layout.shards / s.shard_id).is_dir()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(shards)} shards are not curated yet (first: {missing[0]}); "
            "run or re-run the per-shard tasks first"
        )
    _run_dedup_stages(config, dedup_plan(config, layout, shards, dedup_tasks(config)))
    merged = _merge_all(config, layout, shards)
    shard_stats = [
        json.loads((layout.shards / s.shard_id / shard_stage.STATS).read_text(encoding="utf-8"))
        for s in shards
    ]
    source_of = [s.source for s in shards]
    report = build_report(config, shard_stats, source_of, merged)
    report_path = write_report(layout.out, report)
    totals = report["totals"]
    return CurationResult(
        output_dir=layout.out,
        curated_paths={s.name: layout.curated(s.name) for s in config.input.sources},
        num_input_lines=totals["num_input_lines"],
        num_kept=totals["num_kept"],
        num_dropped=totals["num_dropped"],
        num_quarantined=totals["num_quarantined"],
        dropped=report["dropped"],
        quarantined=report["quarantined"],
        report_path=report_path,
        pii=report["pii"],
    )

"""The phases of curation (raw JSONL -> curated JSONL), each resumable, run under `<out>/work/`:
  1. shards/    one directory per input shard, in parallel (read .. PII, exact keys, MinHash signatures)
  2. dedup/     one global pass: exact groups, then LSH over all signatures; the decision array
  3. merged/    per source: curated/, dropped/, quarantine/ JSONL assembled in input order
Each unit is written under a temporary name and renamed when complete, so a killed run picks up at
the first unfinished unit. Stage order: decontamination runs before dedup so that a contaminated
document can never be the copy that removes its clean near-duplicates; PII redaction runs before
dedup so documents that differ only in e-mail addresses or phone numbers count as copies.

The local pool and datatrove's executors (data_prep/cluster.py) both run these phases;
data_prep/pipeline.py picks one.
"""

from __future__ import annotations

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
from kumihimo.data_prep import scoring, shard_stage
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.decontam import build_eval_index, save_eval_index
from kumihimo.data_prep.documents import Shard
from kumihimo.data_prep.executor import process_pool, run_unordered
from kumihimo.data_prep.jsonl_io import AtomicJsonlWriter
from kumihimo.data_prep.layout import CURATION_SECTIONS, RunLayout
from kumihimo.data_prep.minhash import KEEP
from kumihimo.data_prep.quality import QualityFilter
from kumihimo.data_prep.refilter import (
    QUALITY_DROPPED,
    find_duplicates_among,
    quality_drop,
    quality_passes,
)
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


# ---- phase 2: global dedup ------------------------------------------------------------------------


def _shard_sizes(layout: RunLayout, shards: list[Shard]) -> np.ndarray:
    sizes = [len(np.load(layout.shards / s.shard_id / shard_stage.EXACT_KEYS, mmap_mode="r")) for s in shards]
    return np.array(sizes, dtype=np.int64)


def _global_dedup(config: DataPrepConfig, layout: RunLayout, shards: list[Shard]) -> None:
    if layout.dedup_decision.is_file():
        return
    layout.dedup_decision.parent.mkdir(parents=True, exist_ok=True)
    sizes = _shard_sizes(layout, shards)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    keys = np.concatenate(
        [np.load(layout.shards / s.shard_id / shard_stage.EXACT_KEYS) for s in shards]
        + [np.empty(0, np.uint64)]
    )
    signatures = None
    sig_path = layout.dedup_decision.parent / "signatures.npy"
    if config.dedup.fuzzy:
        num_perm = config.dedup.num_bands * config.dedup.rows_per_band
        # one memory-mapped array over all shards: the band pass reads columns, not whole corpora
        signatures = np.lib.format.open_memmap(
            sig_path, mode="w+", dtype=np.uint32, shape=(int(offsets[-1]), num_perm)
        )
        for shard, start, end in zip(shards, offsets[:-1], offsets[1:]):
            signatures[start:end] = np.load(layout.shards / shard.shard_id / shard_stage.SIGNATURES)
        signatures.flush()
    passes = None
    if config.filters.refilterable:  # carried documents: the thresholds decide which take part
        passes = quality_passes(config, [layout.shards / s.shard_id / shard_stage.CANDIDATES for s in shards])
    dedup_log.info(f"{int(offsets[-1])} candidate documents, {len(shards)} shards")
    decision = find_duplicates_among(keys, signatures, config, passes)
    tmp = layout.dedup_decision.with_name(f"decision{TEMP_MARK}{os.getpid()}.npz")
    np.savez(
        tmp,
        duplicate_of=decision.duplicate_of,
        is_exact=decision.is_exact,
        offsets=offsets,
        num_candidate_pairs=np.array(decision.num_candidate_pairs),
    )
    os.replace(tmp, layout.dedup_decision)
    del signatures
    sig_path.unlink(missing_ok=True)


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
    decision: dict[str, np.ndarray],
    kept_ids: dict[int, str],
    cluster_sizes: np.ndarray | None = None,
) -> dict[str, Any]:
    duplicate_of, is_exact, offsets = decision["duplicate_of"], decision["is_exact"], decision["offsets"]
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
            start = int(offsets[shard.index])
            with open(shard_dir / shard_stage.CANDIDATES, encoding="utf-8") as handle:
                for row, line in enumerate(handle):
                    target = int(duplicate_of[start + row])
                    record = json.loads(line)
                    if target == KEEP:
                        if cluster_sizes is None:
                            curated.write_line(line)
                        else:
                            record.setdefault("attributes", {})["cluster_size"] = int(
                                cluster_sizes[start + row]
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
                    reason = "exact_duplicate" if is_exact[start + row] else "near_duplicate"
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


def _cluster_sizes(duplicate_of: np.ndarray) -> np.ndarray:
    """Per global row: 1 + the rows removed as its exact or near duplicates (meaningful for kept rows).

    Every removed duplicate points straight at its cluster's kept document (find_duplicates follows
    chains to the final keeper), so one bincount counts each cluster once.
    """
    removed = duplicate_of[duplicate_of >= 0]
    assert np.all(duplicate_of[removed] == KEEP), "a duplicate points at a document that was not kept"
    return 1 + np.bincount(removed, minlength=len(duplicate_of))


def _merge_all(config: DataPrepConfig, layout: RunLayout, shards: list[Shard]) -> dict[str, dict[str, Any]]:
    with np.load(layout.dedup_decision) as data:
        decision = {k: data[k] for k in data.files}
    summaries: dict[str, dict[str, Any]] = {}
    todo = [
        s.name
        for s in config.input.sources
        if not layout.merged_marker(s.name).is_file() or not layout.curated(s.name).is_file()
    ]
    targets = np.unique(decision["duplicate_of"][decision["duplicate_of"] >= 0]) if todo else np.empty(0)
    kept_ids = _kept_ids(layout, shards, decision["offsets"], targets) if len(targets) else {}
    cluster_sizes = _cluster_sizes(decision["duplicate_of"]) if config.dedup.record_cluster_size else None
    for source in config.input.sources:
        if source.name in todo:
            summaries[source.name] = _merge_source(
                source.name, config, layout, shards, decision, kept_ids, cluster_sizes
            )
        else:
            summaries[source.name] = json.loads(layout.merged_marker(source.name).read_text(encoding="utf-8"))
    return summaries


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
    """Phases 2 and 3 (global dedup over every shard's keys and signatures, per-source merge) and the
    report; refuses to start while a shard is missing."""
    layout = RunLayout(Path(config.output_dir))
    shards = plan_shards(config)
    _check_or_record_run(layout, config, shards)
    missing = [s.shard_id for s in shards if not (layout.shards / s.shard_id).is_dir()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(shards)} shards are not curated yet (first: {missing[0]}); "
            "run or re-run the per-shard tasks first"
        )
    _global_dedup(config, layout, shards)
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

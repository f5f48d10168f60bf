"""The data_prep entry points: curate (raw JSONL -> curated JSONL), refilter (new thresholds on a curated
run) and build_datasets (-> Megatron datasets + blend).

curate picks the executor: the local process pool here, or datatrove's (data_prep/cluster.py). The
phases themselves live in data_prep/curation.py, the tokenizing in data_prep/tokenize_stage.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.processes import RunLock
from kumihimo.data_prep import tokenize_stage
from kumihimo.data_prep.config import DataPrepConfig
from kumihimo.data_prep.curation import (
    CurationResult,
    curate_shards,
    finish_curation,
    prepare_run,
    run_fingerprint,
)
from kumihimo.data_prep.layout import OUTPUT_FOLDERS, RunLayout
from kumihimo.data_prep.refilter import prepare_refilter
from kumihimo.data_prep.shards import expand_source_paths, plan_shards

log = stage_logger("data_prep")


def curate(config: DataPrepConfig) -> CurationResult | None:
    """Raw JSONL of every source -> `<out>/curated/<source>.jsonl` (+ dropped/, quarantine/, report).

    executor.kind=local runs every phase here with a process pool; the datatrove kinds run phase 1 as
    datatrove tasks and phases 2-3 as a dependent single task (data_prep/cluster.py). With
    datatrove-slurm the jobs are only submitted and None is returned.
    """
    if config.executor.kind != "local":
        try:
            from kumihimo.data_prep.cluster import (
                curate_with_datatrove,
            )  # datatrove is an optional dependency
        except ImportError as exc:
            raise UserError(
                f"executor.kind={config.executor.kind} needs datatrove ({exc}); "
                "run `pip install datatrove` or use executor.kind=local"
            ) from exc
        return curate_with_datatrove(config)
    inputs = tuple(p for s in config.input.sources for p in expand_source_paths(s.paths, s.name))
    # one live run per output_dir; clears a killed one's debris, never an input
    with RunLock(config.output_dir, "curate", OUTPUT_FOLDERS, keep=inputs):
        layout, shards = prepare_run(config)
        log.info(f"{len(shards)} shards from {len(config.input.sources)} sources -> {layout.out}")
        curate_shards(config, layout, shards)
        return finish_curation(config)


def refilter(config: DataPrepConfig) -> CurationResult:
    """Apply `config`'s quality thresholds to the run in its output_dir (curated with
    filters.refilterable=true) without curating again: dedup and merge only (data_prep/refilter.py)."""
    layout = RunLayout(Path(config.output_dir))
    shards = plan_shards(config)
    manifest = layout.work / "run.json"
    if manifest.is_file():
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous.get("inputs") != run_fingerprint(config, shards)["inputs"]:
            raise UserError(
                f"the input files changed since output_dir={str(layout.out)!r} was curated; curate again"
            )
    prepare_refilter(config)
    return finish_curation(config)


def build_datasets(config: DataPrepConfig, tokenizer_path: str | Path) -> tokenize_stage.BuildResult:
    """Curated JSONL -> `<out>/datasets/<source>_text_document.{bin,idx}` + `<out>/blend.yaml`."""
    return tokenize_stage.build_datasets(config, tokenizer_path)

"""The folder layout of a data_prep run under output_dir: which folders curate and tokenize own, where
each phase's files live (RunLayout), and which config sections decide what curate produces (recorded in
work/run.json; refilter may change only thresholds of those). curate, refilter and tokenize all read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The folders under output_dir that curate and tokenize write: a killed run's temporary files are
# removed from these (and the top of output_dir) only, never from anything else a shared folder holds.
OUTPUT_FOLDERS = ("curated", "dropped", "quarantine", "work", "datasets")

# Sections whose values change what curate produces; the others (workers, report, tokenize) do not.
CURATION_SECTIONS = ("input", "repair", "langid", "filters", "cleanup", "decontam", "pii", "dedup")


@dataclass
class RunLayout:
    """Where a run under `out` keeps each of its files and folders."""

    out: Path

    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    @property
    def dedup_folder(self) -> Path:
        return self.work / "dedup"

    @property
    def eval_index(self) -> Path:
        return self.work / "eval_index_v2.npy"  # v2: vectorised word hashes (v1 files are not reused)

    def merged_marker(self, source: str) -> Path:
        return self.work / "merged" / f"{source}.json"

    def curated(self, source: str) -> Path:
        return self.out / "curated" / f"{source}.jsonl"

    def dropped(self, source: str) -> Path:
        return self.out / "dropped" / f"{source}.jsonl"

    def quarantine(self, source: str) -> Path:
        return self.out / "quarantine" / f"{source}.jsonl"

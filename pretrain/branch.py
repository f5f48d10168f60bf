"""Branches: a run that starts from another run's checkpoint (`branch.source`) with its model and
optimizer state but a new blend and a new learning-rate schedule, e.g. a WSD decay of the last steps
on a mid-training mix.

What a branch keeps and what it starts anew is decided here and in `Trainer._start_branch`:

- kept: weights, Adam moments and step counts, fp32 main weights, and the RNG (at the same TP/PP);
- new: the step counter, the data position (the new blend's first sample is sample 0, so nothing is
  repeated or skipped whatever the old weights were), the learning-rate schedule, built from this
  config alone (neither the source's scheduler state nor its param groups' peak LR are loaded).

The lineage (source folder, iteration, a hash of the source's run_config.yaml and kumihimo.json, its
data fingerprint and position) is resolved once, written into run_config.yaml (branch.iteration,
branch.source_sha256) and into every checkpoint's kumihimo.json, and read back from the branch's own
checkpoints when a requeued job resumes, so a chain of branches stays traceable.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kumihimo.core.configtree import ConfigError, bad_value
from kumihimo.pretrain import checkpoint_format

if TYPE_CHECKING:
    from kumihimo.pretrain.config import TrainConfig


def source_sha256(folder: Path) -> str:
    """sha256 of a checkpoint's run_config.yaml followed by its kumihimo.json."""
    digest = hashlib.sha256()
    for name in (checkpoint_format.CONFIG_FILE, checkpoint_format.META_FILE):
        path = folder / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return digest.hexdigest()


def resolve_lineage(config: TrainConfig) -> dict[str, Any] | None:
    """The lineage of this run if it is a branch (None otherwise), from its own newest checkpoint when it
    has one (a requeued branch), else from the source. Fills in config.branch.iteration and
    source_sha256, so run_config.yaml records what was resolved."""
    spec = config.branch
    if spec.source is None:
        return None
    own = config.checkpoint_dir
    own_latest = checkpoint_format.read_latest(Path(own)) if own else None
    if own_latest is not None:
        lineage = _recorded_lineage(Path(own), own_latest, config)
    else:
        lineage = _lineage_from_source(config)
    spec.iteration, spec.source_sha256 = lineage["iteration"], lineage["source_sha256"]
    return lineage


def _lineage_from_source(config: TrainConfig) -> dict[str, Any]:
    spec = config.branch
    folder = checkpoint_format.find_checkpoint(Path(spec.source), spec.iteration)
    meta = checkpoint_format.read_meta(folder)
    if meta.get("weights_only"):
        raise ConfigError(
            f"branch.source={spec.source!r}: {folder} holds weights only (no optimizer state to branch "
            "with); start from it with checkpoint.pretrained instead"
        )
    digest = source_sha256(folder)
    if spec.source_sha256 is not None and spec.source_sha256 != digest:
        raise bad_value(
            "branch.source_sha256",
            spec.source_sha256,
            f"does not match {folder} (sha256 {digest}): the source was replaced since it was recorded",
            "check branch.source and branch.iteration, or set branch.source_sha256=null to accept it",
        )
    state = meta.get("train_state") or {}
    config_path = folder / checkpoint_format.CONFIG_FILE
    saved = (yaml.safe_load(config_path.read_text()) or {}) if config_path.is_file() else {}
    return {
        "source": str(folder.resolve()),
        "source_root": str(Path(spec.source).resolve()),
        "source_run": saved.get("name"),
        "iteration": int(state.get("iteration", 0)),
        "source_sha256": digest,
        "source_consumed_samples": int(state.get("consumed_samples", 0)),
        "source_consumed_tokens": int(state.get("consumed_tokens", 0)),
        "source_data_fingerprint": meta.get("data_fingerprint"),
        "source_lineage": meta.get("lineage"),
    }


def _recorded_lineage(own: Path, own_latest: int, config: TrainConfig) -> dict[str, Any]:
    """The lineage a requeued branch recorded in its newest checkpoint; refuses a folder holding another
    run's checkpoints, or settings that name another source than the one the branch started from."""
    spec = config.branch
    folder = checkpoint_format.iteration_dir(own, own_latest)
    lineage = checkpoint_format.read_meta(folder).get("lineage")
    if lineage is None:
        raise ConfigError(
            f"branch.source is set but the checkpoint folder {own} already holds checkpoints of a run that "
            "is not a branch; give the branch its own output_dir or checkpoint.dir"
        )
    recorded = {
        "branch.source": (lineage["source_root"], str(Path(spec.source).resolve())),
        "branch.iteration": (lineage["iteration"], spec.iteration),
        "branch.source_sha256": (lineage["source_sha256"], spec.source_sha256),
    }
    for key, (then, now) in recorded.items():
        if now is not None and now != then:
            raise bad_value(
                key,
                now,
                f"differs from what {folder} records ({then!r}): this run's checkpoints branched from there",
                f"set {key}={then} (or null) to resume it, or give a new branch its own output_dir",
            )
    return lineage

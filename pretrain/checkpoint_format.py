"""The checkpoint folder format: what `kumihimo train` writes next to the torch_dist shards and what every
reader of a checkpoint (resume, branch, `convert`, `evaluate`) needs to find and describe one.

    <dir>/iter_0000100/             one checkpoint: torch_dist shards + metadata, plus
        run_config.yaml             CONFIG_FILE: the resolved TrainConfig the run was started with
        kumihimo.json               META_FILE: step and consumed samples/tokens (TrainState), parallel
                                    layout, vocab sizes, tokenizer identity, data blend and fingerprint,
                                    library versions, and for imported weights their `source`
    <dir>/latest_checkpointed_iteration.txt    LATEST_FILE, written last, atomically
    <dir>/.kumihimo-train.lock      LOCK_FILE: the run that writes here

Owns the file names, finding a checkpoint (`find_checkpoint`, `read_latest`), reading its records
(`read_meta`, `read_run_config`), the sharding metadata every torch_dist save records
(`SHARDING_METADATA`, which `convert from-hf` writes too) and the vocabulary rows an export keeps
(`source_vocab_rows`: the tokenizer's, or those of the Hugging Face model the weights were imported
from). Stdlib and the config schema only: writing and loading the shards is `pretrain.checkpointing`'s,
converting `pretrain.convert`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.pretrain.config import TrainConfig, from_saved

log = stage_logger("convert")
"""Notes about a checkpoint's origin are the converter's (it exports the imported rows)."""

LATEST_FILE = "latest_checkpointed_iteration.txt"
LOCK_FILE = ".kumihimo-train.lock"
META_FILE = "kumihimo.json"
CONFIG_FILE = "run_config.yaml"
# Passed explicitly, as Megatron-LM does: the defaults of 0.19.2 fail to save the optimizer.
SHARDING_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def read_latest(root: Path) -> int | None:
    marker = root / LATEST_FILE
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise UserError(f"{marker} holds {text!r}, not an iteration; fix or delete it")
    return int(text)


def read_meta(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / META_FILE
    if not path.is_file():
        raise UserError(
            f"{checkpoint} has no {META_FILE}: not a complete kumihimo checkpoint; pick another "
            "iteration or resave it"
        )
    return json.loads(path.read_text())


def find_checkpoint(root: Path, iteration: int | None = None) -> Path:
    """The folder of `iteration`, or of the latest complete checkpoint under `root`."""
    if iteration is None:
        iteration = read_latest(root)
        if iteration is None:
            raise UserError(f"{root} holds no {LATEST_FILE}: no complete checkpoint there; check the path")
    folder = iteration_dir(root, iteration)
    if not folder.is_dir():
        found = sorted(p.name for p in root.glob("iter_*") if not p.name.endswith(".tmp"))
        raise UserError(
            f"iteration {iteration} is not in {root} (found: {', '.join(found) or 'none'}); pick one of those"
        )
    return folder


def read_run_config(checkpoint: Path) -> TrainConfig:
    """The TrainConfig a checkpoint was saved with (its run_config.yaml, any release's spelling)."""
    return from_saved(configtree.read_yaml(checkpoint / CONFIG_FILE))


def imported_vocab_rows(meta: dict[str, Any], config: Any = None, depth: int = 0) -> int | None:
    """config.json vocab_size of the Hugging Face model the weights were imported from by `convert from-hf`:
    recorded in an imported (or averaged) checkpoint's kumihimo.json, and for a run trained from one, in
    the checkpoint its `checkpoint.pretrained` (or its branch's `branch.source`) names, followed back
    while those checkpoints still exist and have the same padded vocabulary. None when there is none."""
    recorded = (meta.get("source") or {}).get("hf_vocab_size")
    if isinstance(recorded, int):
        return recorded
    if config is None or depth >= 16:
        return None
    branch = getattr(config, "branch", None)
    origins = [(config.checkpoint.pretrained, None)]
    if branch is not None:  # a branch's run_config.yaml records the source iteration it started from
        origins.append((branch.source, branch.iteration))
    for origin, iteration in origins:
        if not origin:
            continue
        # That iteration, or (rotated away since) the source's latest: all saves of a run name the same origin.
        at = iteration_dir(Path(origin), iteration) if iteration is not None else None
        try:
            folder = at if at is not None and at.is_dir() else find_checkpoint(Path(origin))
            origin_meta = read_meta(folder)
            origin_config = read_run_config(folder)
        except (UserError, OSError, ValueError):
            log.info(
                f"note: {origin}, which this run started from, cannot be read; rows of the imported "
                "model beyond its tokenizer (if any) are not exported"
            )
            continue
        if origin_meta.get("padded_vocab_size") == meta.get("padded_vocab_size"):
            rows = imported_vocab_rows(origin_meta, origin_config, depth + 1)
            if rows is not None:
                return rows
    return None


def source_vocab_rows(meta: dict[str, Any], config: Any = None) -> int:
    """Rows of embed_tokens/lm_head the exported model has: the tokenizer's tokens, or, for weights
    imported by `convert from-hf` (and runs trained from them), the vocab_size of the Hugging Face model
    they came from (models often carry rows beyond their tokenizer, e.g. Qwen2.5; they go back)."""
    vocab, padded = meta["vocab_size"], meta["padded_vocab_size"]
    recorded = imported_vocab_rows(meta, config)
    if isinstance(recorded, int) and vocab <= recorded <= padded:
        return recorded
    return vocab

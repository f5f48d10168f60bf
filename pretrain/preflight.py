"""The start-up checks that read this machine's files, run before any process starts: by `kumihimo
train` (also with --check) and by `kumihimo doctor --config`. The config schema (`pretrain.config`)
checks only what a recipe says; whether its paths exist, its datasets and tokenizer agree, its output
folders are writable and its branch source is usable is checked here.

- `check_data_paths`: the blend file, each prefix's .idx and the tokenizer exist and can be read.
- `check_paths`: the above, the datasets against the tokenizer (the trainer repeats that on every rank
  before building the model), the output folders, and a branch's source checkpoint.
- `check_pretrained_at_check`: `kumihimo train --check`'s vocabulary check of checkpoint.pretrained.
"""

from __future__ import annotations

import copy
from pathlib import Path

from kumihimo.core.configtree import bad_value
from kumihimo.pretrain import data_inspection, integrity
from kumihimo.pretrain.branch import resolve_lineage
from kumihimo.pretrain.checkpoint_format import find_checkpoint, read_latest, read_meta
from kumihimo.pretrain.config import DataConfig, TrainConfig
from kumihimo.pretrain.parallel import padded_vocab_size
from kumihimo.tokenizer.base import load_tokenizer
from kumihimo.tokenizer.hf import hf_tokenizer_folder
from kumihimo.tokenizer.spm import resolve_model_path


def check_data_paths(data: DataConfig) -> None:
    """Existence checks, run at launch (recipes for a cluster validate anywhere)."""
    if data.mock:
        return
    if data.blend_file is not None and not Path(data.blend_file).is_file():
        raise bad_value(
            "data.blend_file",
            data.blend_file,
            "does not exist",
            "run `kumihimo data tokenize` first or fix the path",
        )
    for i, entry in enumerate(data.blend):
        if not Path(entry.prefix + ".idx").is_file():
            raise bad_value(
                f"data.blend[{i}].prefix",
                entry.prefix,
                "has no .idx file",
                "give the prefix (without .bin/.idx) of a dataset that exists",
            )
    if data.tokenizer is not None:
        try:
            if hf_tokenizer_folder(data.tokenizer) is None:
                resolve_model_path(data.tokenizer)
        except ValueError as exc:
            raise bad_value(
                "data.tokenizer",
                data.tokenizer,
                "is neither a SentencePiece model nor a Hugging Face tokenizer folder (tokenizer.json)",
                "train one with `kumihimo tokenizer train` or fix the path",
            ) from exc


def check_paths(config: TrainConfig) -> None:
    """Checks that need the files of this machine; `kumihimo train` runs them before launching."""
    check_data_paths(config.data)
    # the trainer repeats this on every rank before building the model
    data_inspection.check_datasets_and_tokenizer(config.data)

    for key, path in (
        ("output_dir", config.output_dir),
        (
            "checkpoint.dir" if config.checkpoint.dir else "output_dir (its checkpoints/)",
            config.checkpoint_dir,
        ),
        ("data.cache_dir", config.data.cache_dir),
    ):
        if path is not None:
            integrity.check_output_dir(key, path)
    source = config.branch.source
    if source is not None:
        own = config.checkpoint_dir
        resumes = own is not None and read_latest(Path(own)) is not None
        # a branch with checkpoints of its own resumes from them: the source may be gone by then
        if not resumes and not Path(source).is_dir():
            raise bad_value(
                "branch.source", source, "is not a folder", "point it at the source run's checkpoint.dir"
            )
        if config.checkpoint_dir and Path(source).resolve() == Path(config.checkpoint_dir).resolve():
            raise bad_value(
                "branch.source",
                source,
                "is this run's own checkpoint folder (its checkpoints would mix with the source's)",
                "give the branch its own output_dir or checkpoint.dir",
            )
        # a missing, weights-only or replaced source is refused here, before any process starts
        resolve_lineage(copy.deepcopy(config))


def check_pretrained_at_check(config: TrainConfig, tp: int) -> list[str]:
    """`kumihimo train --check`: the same vocabulary refusal as at the start of training, for
    checkpoint.pretrained with a tokenizer (the trainer otherwise reports it only after building the
    model). Notes as check_pretrained returns them; nothing to check without either."""
    if config.checkpoint.pretrained is None or config.data.tokenizer is None:
        return []
    folder = find_checkpoint(Path(config.checkpoint.pretrained))
    tokenizer = load_tokenizer(config.data.tokenizer)
    padded = padded_vocab_size(tokenizer.vocab_size, config.model.make_vocab_size_divisible_by, tp)
    return integrity.check_pretrained(
        read_meta(folder), folder, config, tokenizer.identity(), tokenizer.vocab_size, padded, tp
    )

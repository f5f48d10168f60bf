"""The (weighted) average of N checkpoints' model weights, as a weights-only kumihimo checkpoint.

Checkpoint averaging (e.g. the last few saves of an annealing run) gives the mean of each weight
tensor over checkpoints of one model. The sources are kumihimo checkpoints saved at any TP/PP (a
checkpoint root, i.e. its latest iteration, or one iter_NNNNNNN folder); every model tensor must
have the same key, shape and dtype in all of them, and they must share the tokenizer.

The output is laid out exactly as `convert from-hf` writes (iter_0000000 with the torch_dist files of
the GPTModel at TP=1/PP=1, run_config.yaml, kumihimo.json with `"weights_only": true`, the latest
marker, the tokenizer copied under tokenizer/), so it is used as `checkpoint.pretrained` at any
layout and exported by `convert to-hf`. kumihimo.json records the sources and their weights.

Arithmetic, per element, in float32 whatever the stored dtype, in the order the checkpoints are given:

    mean = (w_1*x_1 + w_2*x_2 + ... + w_N*x_N) / (w_1 + ... + w_N)

The weights are relative (any positive numbers; `--weights 3 1` is 3:1) and default to 1 each, in
which case no product is formed and the mean is (x_1 + ... + x_N) / N. The result is rounded once to
the stored dtype. Tensors are read one at a time (one layer of a stacked tensor, or the embedding)
from one checkpoint at a time into a float32 accumulator, so memory stays at a few copies of the
largest tensor whatever N and the model size (52 MiB above the baseline for three 236 MiB checkpoints
whose largest tensor is 8 MiB; tests/test_convert_average.py). The folder appears only when complete.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, WriteItem

from kumihimo.core import configtree
from kumihimo.core.errors import UserError
from kumihimo.core.logs import stage_logger
from kumihimo.core.progress import Progress
from kumihimo.pretrain import checkpoint_format
from kumihimo.pretrain.config import BranchConfig, TrainConfig
from kumihimo.pretrain.convert.dcp_files import (
    copy_hf_tokenizer,
    pickled_object,
    save_streamed,
    staged_output,
    weights_only_meta,
)
from kumihimo.pretrain.convert.from_hf import TOKENIZER_DIR, Chunk, plan_chunks, write_item_for
from kumihimo.pretrain.convert.mapping import LlamaDims
from kumihimo.pretrain.convert.to_hf import (
    Source,
    check_architecture,
    dims_for,
    open_checkpoint,
)

log = stage_logger("average")


def relative_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The weights to use (1 each by default); refused unless one positive finite number per checkpoint."""
    if weights is None:
        return [1.0] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise UserError(
            f"--weights has {len(weights)} value(s) for {count} checkpoints; give one weight per checkpoint"
        )
    for position, weight in enumerate(weights, start=1):
        if not (weight > 0 and weight != float("inf")):
            raise UserError(
                f"--weights value {weight} (for checkpoint {position}) is not a positive number; weights are "
                "relative (e.g. 3 1 for 3:1), so give each checkpoint a positive one"
            )
    return weights


def average_tensor(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The formula of the module docstring, for tensors already in memory (also the reference the
    streaming path is tested against); float32 result."""
    accumulator = None
    for tensor, weight in zip(tensors, weights):
        accumulator = _accumulate(accumulator, tensor, weight)
    return accumulator / float(sum(weights))


def _accumulate(accumulator: torch.Tensor | None, tensor: torch.Tensor, weight: float) -> torch.Tensor:
    term = tensor.to(torch.float32) if weight == 1.0 else tensor.to(torch.float32) * weight
    if accumulator is None:
        return term if term is not tensor else tensor.clone()
    accumulator += term
    return accumulator


# ---------------------------------------------------------------------------------------------
# The sources: same model, same tokenizer
# ---------------------------------------------------------------------------------------------


def _name(position: int, source: Source) -> str:
    return f"checkpoint {position} ({source.folder})"


def check_same_model(sources: list[Source]) -> LlamaDims:
    """Refuse sources whose model tensors, vocabulary or tokenizer differ from the first one's, naming
    the first difference; returns the shapes of the (common) model."""
    first = sources[0]
    reference = first.reader.tensors
    for position, source in enumerate(sources[1:], start=2):
        tensors = source.reader.tensors
        for key in sorted(set(reference) | set(tensors)):
            if key not in tensors or key not in reference:
                holder, lacking = (1, position) if key not in tensors else (position, 1)
                raise UserError(
                    f"{_name(lacking, sources[lacking - 1])} lacks tensor {key} that "
                    f"{_name(holder, sources[holder - 1])} has; only checkpoints of the same model can be averaged"
                )
            for what, mine, theirs in (
                ("shape", list(tensors[key].size), list(reference[key].size)),
                ("dtype", tensors[key].properties.dtype, reference[key].properties.dtype),
            ):
                if mine != theirs:
                    raise UserError(
                        f"{_name(position, source)}: tensor {key} has {what} {mine} but {_name(1, first)} "
                        f"has {theirs}; only checkpoints of the same model (and precision) can be averaged"
                    )
        for field in ("vocab_size", "padded_vocab_size"):
            if source.meta[field] != first.meta[field]:
                raise UserError(
                    f"{_name(position, source)} has {field} {source.meta[field]} but {_name(1, first)} has "
                    f"{first.meta[field]}; average checkpoints trained with the same tokenizer"
                )
        mine, theirs = _tokenizer_sha(source), _tokenizer_sha(first)
        if mine != theirs:
            raise UserError(
                f"{_name(position, source)} was trained with tokenizer sha256 {str(mine)[:12]} but "
                f"{_name(1, first)} with {str(theirs)[:12]}; average checkpoints trained with the same tokenizer"
            )
        differing = [
            key
            for key, value in configtree.to_dict(source.config.model).items()
            if configtree.to_dict(first.config.model).get(key) != value
        ]
        if differing:
            log.info(
                f"warning: model.{', model.'.join(differing)} of {_name(position, source)} differ "
                f"from {_name(1, first)}'s; the output's run_config.yaml takes checkpoint 1's"
            )
    dims = dims_for(first, keep_vocab_padding=False)
    check_architecture(first.reader, dims)
    return dims


def _tokenizer_sha(source: Source) -> str | None:
    return (source.meta.get("tokenizer") or {}).get("sha256")


# ---------------------------------------------------------------------------------------------
# Writing the averaged chunks with torch.distributed.checkpoint, one tensor in memory at a time
# ---------------------------------------------------------------------------------------------


class _AveragingSavePlanner(DefaultSavePlanner):
    """Plans the chunks `convert from-hf` writes and makes each one's data, averaged, when asked."""

    def __init__(self, sources: list[Source], weights: list[float], dims: LlamaDims, progress: Progress):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        chunks = plan_chunks(dims)
        readers = [source.reader for source in sources]
        self.items = [
            write_item_for(chunk, dims, readers[0].dtype(chunk.key) if chunk.rule else torch.float32)
            for chunk in chunks
        ]
        self.chunks = {item.index: chunk for item, chunk in zip(self.items, chunks)}
        self.readers, self.weights, self.progress = readers, weights, progress
        self._cached: tuple[tuple[str, tuple[int, ...]], torch.Tensor] | None = None

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def _averaged(self, key: str, index: tuple[int, ...]) -> torch.Tensor:
        """The average of one tensor (one layer, or one expert of a layer, of a stacked one: the
        leading indices `index`) in its stored dtype; kept until the
        next tensor is asked for, as a tensor may be stored in several chunks (SwiGLU's gate and up)."""
        if self._cached is not None and self._cached[0] == (key, index):
            return self._cached[1]
        self._cached = None  # free the previous tensor before reading the next
        accumulator = None
        for reader, weight in zip(self.readers, self.weights):
            tensor = reader.read({key: (key, index)})[key]
            accumulator = _accumulate(accumulator, tensor, weight)
            del tensor
        accumulator /= float(sum(self.weights))
        averaged = accumulator.to(self.readers[0].dtype(key))
        self._cached = ((key, index), averaged)
        return averaged

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        chunk: Chunk = self.chunks[write_item.index]
        if chunk.ends_layer:
            self.progress.update()
        if chunk.rule is None:
            return pickled_object(chunk.payload)
        averaged = self._averaged(chunk.key, chunk.index)
        start, stop = chunk.rows
        if (start, stop) != (0, averaged.shape[0]):
            averaged = averaged[start:stop].clone()  # torch.save of a view would store the whole tensor
        return averaged.view(*[1] * len(chunk.index), *averaged.shape)


def write_average(folder: Path, sources: list[Source], weights: list[float], dims: LlamaDims) -> int:
    """The torch_dist files and metadata.json of the averaged weights; returns the bytes written."""
    with Progress("average", total=dims.num_layers, unit="layers") as progress:
        return save_streamed(folder, _AveragingSavePlanner(sources, weights, dims, progress))


# ---------------------------------------------------------------------------------------------
# Tokenizer, config and metadata of the output
# ---------------------------------------------------------------------------------------------


def copy_tokenizer(source: Source, output_root: Path, staging_root: Path) -> dict[str, Any] | None:
    """Copy the tokenizer the sources were trained with beside the output (as from-hf does), so the
    averaged checkpoint stands alone; returns its identity with the new path (None for mock data).

    A SentencePiece model is one file; of a Hugging Face tokenizer folder (which may be a whole model
    folder) only the files that make up its identity are copied, plus config.json that AutoTokenizer may
    read. The copy must have the recorded sha256; otherwise nothing is copied and the identity is kept."""
    from kumihimo.tokenizer.base import load_tokenizer
    from kumihimo.tokenizer.hf import HFTokenizer

    identity = source.meta.get("tokenizer")
    if not identity:
        return None
    recorded = Path(identity.get("path") or "")
    target = staging_root / TOKENIZER_DIR
    target.mkdir()
    try:
        if identity.get("kind") == HFTokenizer.kind:
            copy_hf_tokenizer(recorded, target, extra=("config.json",))
            copied, final = HFTokenizer(target).sha256, output_root / TOKENIZER_DIR
        else:
            shutil.copyfile(recorded, target / recorded.name)
            copied, final = (
                load_tokenizer(target / recorded.name).sha256,
                output_root / TOKENIZER_DIR / recorded.name,
            )
    except (OSError, UserError) as exc:
        copied, problem = None, f"cannot be read here ({exc})"
    else:
        problem = f"has sha256 {copied[:12]}, not the recorded {str(identity.get('sha256'))[:12]}"
    if copied is None or copied != identity.get("sha256"):
        shutil.rmtree(target)
        log.info(
            f"warning: the tokenizer {recorded} the checkpoints record {problem}; it is not copied and "
            "kumihimo.json keeps its identity (convert to-hf will need --tokenizer)"
        )
        return dict(identity)
    return {**identity, "path": str(final.resolve())}


def output_meta(
    sources: list[Source], weights: list[float], tokenizer: dict[str, Any] | None
) -> dict[str, Any]:

    first = sources[0]
    total = sum(weights)
    source_info: dict[str, Any] = {
        "averaged": [
            {
                "checkpoint": str(source.folder.resolve()),
                "iteration": source.iteration,
                "consumed_tokens": (source.meta.get("train_state") or {}).get("consumed_tokens"),
                "weight": weight / total,
            }
            for source, weight in zip(sources, weights)
        ],
        "formula": "sum(w_i * x_i) / sum(w_i) per element, in float32, in the listed order",
    }
    # Rows of a model imported by from-hf beyond its tokenizer: to-hf exports them (see checkpoint_format.source_vocab_rows).
    hf_rows = {checkpoint_format.imported_vocab_rows(source.meta, source.config) for source in sources}
    if len(hf_rows) == 1 and isinstance(next(iter(hf_rows)), int):
        source_info["hf_vocab_size"] = next(iter(hf_rows))
    return weights_only_meta(
        first.meta["vocab_size"], first.meta["padded_vocab_size"], tokenizer, source_info
    )


def average_checkpoints(
    checkpoints: Sequence[str | Path], output_dir: str | Path, weights: Sequence[float] | None = None
) -> Path:
    """Write the weights-only checkpoint root of the (weighted) average of `checkpoints`; returns it.

    Each entry is a checkpoint root (its latest iteration) or one iter_NNNNNNN folder; `weights` are
    relative (default: equal)."""
    if len(checkpoints) < 2:
        raise UserError(f"averaging needs at least two checkpoints, got {len(checkpoints)}; list them all")
    weights = relative_weights(weights, len(checkpoints))
    sources = [open_checkpoint(Path(path)) for path in checkpoints]
    dims = check_same_model(sources)
    output_dir = Path(output_dir)
    started = time.monotonic()
    with staged_output(output_dir, "convert average") as staging:
        tokenizer = copy_tokenizer(sources[0], output_dir, staging)
        folder = checkpoint_format.iteration_dir(staging, 0)
        folder.mkdir()
        num_bytes = write_average(folder, sources, weights, dims)
        config = sources[0].config
        config.data.tokenizer = tokenizer["path"] if tokenizer else config.data.tokenizer
        # A new root, not a run: none of checkpoint 1's run folders or origin (as a recipe, its
        # output_dir / checkpoint.dir would resume and rotate checkpoint 1's run), as from-hf writes it.
        config.output_dir, config.branch = TrainConfig().output_dir, BranchConfig()
        config.checkpoint.dir = config.checkpoint.load = config.checkpoint.pretrained = None
        configtree.save(config, folder / checkpoint_format.CONFIG_FILE)
        meta = output_meta(sources, weights, tokenizer)
        (folder / checkpoint_format.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (staging / checkpoint_format.LATEST_FILE).write_text("0\n")
    elapsed = time.monotonic() - started
    shares = ", ".join(f"{w / sum(weights):.3g}" for w in weights)
    log.info(
        f"wrote weights-only checkpoint {output_dir}: the average of {len(sources)} checkpoints "
        f"(weights {shares}; {num_bytes / 1e9:.2f} GB in {elapsed:.1f} s); use it as checkpoint.pretrained "
        "or export it with `kumihimo convert to-hf`"
    )
    return output_dir

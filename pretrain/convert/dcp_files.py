"""What the converters need around their files: an output folder that appears only when complete, the
real error inside torch.distributed.checkpoint's wrapper, the streaming DCP writer that `convert
from-hf` and `convert average` share (`SequentialWriter`, `pickled_object`) with the two DCP records
it builds itself, adapted to the torch release that is installed, and the copy of a Hugging Face
tokenizer's files (`copy_hf_tokenizer`) that from-hf, average and to-hf make.

torch's DCP records change between releases: `TensorProperties` gained a `strides` field in 2.15 (2.14
and older have none), and the file writer's per-item location `_StorageInfo` is private. The writer
builds both through `plain_tensor_properties` and `storage_location`, which look at the fields the
installed torch defines, so the checkpoint it writes is what `dist_checkpointing.save` writes on that
same torch (tests/test_convert_from_hf.py compares the two on whatever torch the suite runs on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter, filesystem
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from kumihimo.core.errors import UserError
from kumihimo.core.files import owned_output_folder


def staged_output(output_dir: Path, written_by: str) -> contextlib.AbstractContextManager[Path]:
    """A private staging folder beside `output_dir`, renamed to `output_dir` when the block succeeds;
    on any error (or a kill) nothing that looks like a finished output is left. A converter writes a
    new folder: an existing non-empty one (even its own earlier output) is refused, never merged into
    (kumihimo.core.files.owned_output_folder, the rule every export shares)."""
    return owned_output_folder(output_dir, "--output", written_by, replace=False)


def failure_cause(exc: BaseException) -> BaseException:
    """The exception that made DCP fail: it wraps them as {rank: (exception, trace)}."""
    if not isinstance(exc, CheckpointException):
        return exc
    return next(iter(exc.failures.values()), (exc, None))[0]


def describe_failure(exc: BaseException) -> str:
    """A reason for a one-line error about a checkpoint that could not be read, never empty: a
    truncated .distcp raises a bare EOFError, whose text is "" (to-hf said "damaged ()")."""
    cause = failure_cause(exc)
    if isinstance(cause, EOFError):
        return "a .distcp file ends early: truncated (a copy or a save that did not finish)"
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


_PROPERTY_FIELDS = frozenset(f.name for f in dataclasses.fields(TensorProperties))


def plain_tensor_properties(dtype: torch.dtype, shape: tuple[int, ...]) -> TensorProperties:
    """The properties DCP records for a plain contiguous tensor of `shape`: with its strides on torch
    releases whose TensorProperties has that field (2.15+), without them before."""
    if "strides" in _PROPERTY_FIELDS:
        return TensorProperties(dtype=dtype, strides=torch.empty(shape, device="meta").stride())
    return TensorProperties(dtype=dtype)


def storage_location(relative_path: str, offset: int, length: int) -> object:
    """Where one written item lies in a .distcp file, as the installed torch's FileSystemReader reads it.

    The record class is private to torch (`filesystem._StorageInfo`); its first three fields have kept
    these names since torch 2.0. A release that renames them fails here, with the fix, instead of
    writing a checkpoint that no reader can open."""
    record = getattr(filesystem, "_StorageInfo", None)
    names = {f.name for f in dataclasses.fields(record)} if dataclasses.is_dataclass(record) else set()
    if not {"relative_path", "offset", "length"} <= names:
        raise UserError(
            f"torch {torch.__version__} stores DCP file locations differently from the releases "
            "kumihimo supports; install a torch within the range pyproject.toml declares"
        )
    return record(relative_path=relative_path, offset=offset, length=length)


def pickled_object(value: Any) -> io.BytesIO:
    """A non-tensor item (an `_extra_state`, the common state) as Megatron stores each sharded object:
    a list of the rank's values, pickled with torch.save."""
    buffer = io.BytesIO()
    torch.save([value], buffer)
    return buffer


class SequentialWriter(FileSystemWriter):
    """A FileSystemWriter that writes the plan's items in plan order into one file (as Megatron's
    writer does, one file per rank), asking the planner for each item's data (`resolve_data`) just
    before writing it and dropping it right after. The stock writer keeps every tensor of a file
    referenced until the file is closed (for its safetensors format), which would hold the whole
    model in memory."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        file_name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with open(Path(self.path) / file_name, "wb") as stream:
            for item in plan.items:
                offset = stream.tell()
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    stream.write(data.getbuffer())
                else:
                    torch.save(data, stream)  # what FileSystemReader reads back (torch.load per item)
                del data
                length = stream.tell() - offset
                results.append(
                    WriteResult(
                        index=item.index,
                        size_in_bytes=length,
                        storage_data=storage_location(file_name, offset, length),
                    )
                )
            stream.flush()
            os.fsync(stream.fileno())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


def save_streamed(folder: Path, planner: Any) -> int:
    """Write the planner's items into `folder` as a single-process torch_dist checkpoint with
    SequentialWriter (the planner produces each item's data when asked), then metadata.json, which
    dist_checkpointing writes last and its loader checks. A UserError raised while producing an item is
    re-raised as itself. Returns the bytes of the .distcp files."""
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.save({}, storage_writer=SequentialWriter(str(folder)), planner=planner, no_dist=True)
    except CheckpointException as exc:
        cause = failure_cause(exc)
        if isinstance(cause, UserError):
            raise cause from None
        raise
    (folder / "metadata.json").write_text(
        json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1})
    )
    return sum(path.stat().st_size for path in folder.glob("*.distcp"))


def copy_hf_tokenizer(source: Path, target: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """Copy the files of the Hugging Face tokenizer at `source` (its folder, or its tokenizer.json) that
    make up its identity (tokenizer.hf.IDENTITY_FILES), its chat template file (transformers 4.43+
    keeps an instruct model's template in chat_template.jinja; it changes no id, so it is not part of the
    identity) and those of `extra`, where present, into the folder `target` (created); returns the names
    copied. A model folder may hold much more (weights); only these files travel."""
    from kumihimo.tokenizer.hf import HF_TOKENIZER_FILE, IDENTITY_FILES

    folder = source.parent if source.name == HF_TOKENIZER_FILE else source
    if not (folder / HF_TOKENIZER_FILE).is_file():
        raise UserError(
            f"{folder} has no {HF_TOKENIZER_FILE}; pass the Hugging Face tokenizer folder the model was trained with"
        )
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (*IDENTITY_FILES, "chat_template.jinja", *extra):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, target / name)
            copied.append(name)
    return copied


def weights_only_meta(
    vocab_size: int, padded_vocab_size: int, tokenizer: dict[str, Any] | None, source: dict[str, Any]
) -> dict[str, Any]:
    """kumihimo.json of a weights-only checkpoint that a converter writes (from-hf, average, upcycle):
    one process's layout, a fresh train state, what it came from (`source`) and the versions that wrote it."""
    import megatron.core

    from kumihimo import __version__
    from kumihimo.pretrain.checkpoint_format import TrainState

    return {
        "format": "kumihimo-torch_dist-v1",
        "weights_only": True,
        "vocab_size": vocab_size,
        "padded_vocab_size": padded_vocab_size,
        "tokenizer": tokenizer,
        "data": None,
        "source": source,
        "versions": {
            "kumihimo": __version__,
            "megatron.core": megatron.core.__version__,
            "torch": torch.__version__,
        },
        "train_state": TrainState().__dict__,
        "layout": {"world_size": 1, "tp": 1, "pp": 1, "cp": 1, "dp": 1, "vpp": None},
    }

"""What both conversion directions need around their files: an output folder that appears only when
complete, the real error inside torch.distributed.checkpoint's wrapper, and the two DCP records the
streaming writer builds itself, adapted to the torch release that is installed.

torch's DCP records change between releases: `TensorProperties` gained a `strides` field in 2.15 (2.14
and older have none), and the file writer's per-item location `_StorageInfo` is private. The writer
builds both through `plain_tensor_properties` and `storage_location`, which look at the fields the
installed torch defines, so the checkpoint it writes is what `dist_checkpointing.save` writes on that
same torch (tests/test_convert_from_hf.py compares the two on whatever torch the suite runs on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorProperties

from kumihimo.core.errors import UserError
from kumihimo.core.files import temp_dir


@contextlib.contextmanager
def staged_output(output_dir: Path) -> Iterator[Path]:
    """Yield a private staging folder beside `output_dir` and rename it to `output_dir` when the block
    succeeds; on any error (or a kill) nothing that looks like a finished output is left."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(
            f"output {str(output_dir)!r} already exists and is not an empty folder; choose a new "
            "folder or delete it"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_dir(output_dir.parent, f".{output_dir.name}.tmp-")
    try:
        yield staging
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def failure_cause(exc: CheckpointException) -> BaseException:
    """The exception that made DCP fail: it wraps them as {rank: (exception, trace)}."""
    return next(iter(exc.failures.values()), (exc, None))[0]


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

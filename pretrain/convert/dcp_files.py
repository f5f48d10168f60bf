"""What both conversion directions need around their files: an output folder that appears only when
complete, and the real error inside torch.distributed.checkpoint's wrapper."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from torch.distributed.checkpoint.api import CheckpointException

from kumihimo.errors import UserError


@contextlib.contextmanager
def staged_output(output_dir: Path) -> Iterator[Path]:
    """Yield a private staging folder beside `output_dir` and rename it to `output_dir` when the block
    succeeds; on any error (or a kill) nothing that looks like a finished output is left."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"output {str(output_dir)!r} already exists and is not an empty folder; choose a new "
                        "folder or delete it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; the output is meant to be shared
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def failure_cause(exc: CheckpointException) -> BaseException:
    """The exception that made DCP fail: it wraps them as {rank: (exception, trace)}."""
    return next(iter(exc.failures.values()), (exc, None))[0]

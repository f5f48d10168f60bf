"""Writing outputs so they appear whole, and with the permissions a plain write would have given them.

Every writer in kumihimo writes under a temporary name beside the target and renames it into place,
so a reader (or a killed run) never sees half a file. `tempfile.mkstemp`/`mkdtemp` create their
files 0600 and folders 0700 whatever the umask, which made every output private to its author:
team members could not read curated data or resume a run. The helpers here create temporary files
and folders with `0o666 & ~umask` and `0o777 & ~umask`, the modes `open()` and `mkdir()` give.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from kumihimo.core.errors import UserError

TEMP_MARK = ".tmp-"
"""In the name of every temporary file or folder kumihimo writes and renames when complete, so the
debris of a killed run can be recognised and removed (kumihimo.core.processes.remove_temporary_files)."""


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc/self/status, 4.7+).

    Setting and restoring it (the only portable way) briefly opens a window in which another thread
    would create files with mode 0o666/0o777, so it is the fallback only.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode `open(path, "w")` would give a new file now."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir(path)` would give a new folder now."""
    return 0o777 & ~current_umask()


def temp_file_beside(path: Path) -> tuple[int, Path]:
    """(open fd, path) of a new temporary file in `path`'s folder, named `.<name>.tmp-<random>`, with
    the mode a plain write would give; the caller renames it onto `path` or removes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, Path(tmp)


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new staging folder in `parent` with the mode a plain `mkdir` would give; `prefix` should hold
    TEMP_MARK."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    staging.chmod(dir_mode())
    return staging


def why_unwritable(exc: OSError) -> str:
    """A short reason for an OSError from creating a folder or file, for a one-line error."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir(parents=True) through a file says EEXIST
        return "a part of the path is a file"
    return exc.strerror or str(exc)


def make_output_folder(path: str | os.PathLike, key: str = "output_dir") -> Path:
    """Create the folder `path` (with its parents) and check that it can be written; a user error
    naming `key` when it is a file or cannot be written, rather than a traceback at the first write."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{key}={str(path)!r} is a file; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(
            f"{key}={str(path)!r} cannot be written ({why_unwritable(exc)}); choose a folder you can "
            "write to, or fix its permissions"
        ) from exc
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` all at once: a temporary file, fsync, rename; never half a file."""
    path = Path(path)
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))

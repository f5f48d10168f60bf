"""Writing outputs so they appear whole, and with the permissions a plain write would have given them.

Every writer in kumihimo writes under a temporary name beside the target and renames it into place,
so a reader (or a killed run) never sees half a file. `tempfile.mkstemp`/`mkdtemp` create their
files 0600 and folders 0700 whatever the umask, which made every output private to its author:
team members could not read curated data or resume a run. The helpers here create temporary files
and folders with `0o666 & ~umask` and `0o777 & ~umask`, the modes `open()` and `mkdir()` give.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from kumihimo.core.errors import UserError

TEMP_MARK = ".tmp-kumihimo-"
"""In the name of every temporary file or folder kumihimo writes and renames when complete, so the
debris of a killed run can be recognised and removed (kumihimo.core.processes.remove_temporary_files).
It names the project: a user's own `notes.tmp-1` or `.draft.bak_1234` must never look like debris."""

OWNER_FILE = ".kumihimo-output.json"
"""Written into every folder an export or a trained tokenizer publishes (`owned_output_folder`): the
folder belongs wholly to that command, which may replace it whole next time; nothing else may."""


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
    """(open fd, path) of a new temporary file in `path`'s folder, named `.<name>.tmp-kumihimo-<random>`, with
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


def _owner(folder: Path) -> tuple[str | None, set[str]]:
    """The command and the top-level names recorded in `folder`'s OWNER_FILE; (None, empty) when there
    is none (or it is unreadable)."""
    try:
        record = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        return str(record["written_by"]), {str(name) for name in record["names"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None, set()


def check_output_folder(
    path: str | os.PathLike,
    key: str,
    written_by: str,
    *,
    replace: bool = True,
    replace_hint: str = "",
    own_names: Iterable[str] = (),
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Refuse, before any work, an output folder that `written_by` (a command, "tokenizer export-hf")
    may not replace whole; returns the path.

    Allowed: a new path, an empty folder, or (with `replace`) a folder this same command published
    and nobody added to since (its OWNER_FILE names the command and what it wrote) or, from releases
    before OWNER_FILE, one holding nothing but `own_names`. Anything else (user files, another command's output, a folder holding one of this
    command's `inputs`) is refused in one line naming `key`: replacing it would delete what kumihimo
    did not write, and writing beside it would mix stale files into the output.
    """
    path = Path(path)
    shown = f"{key}={str(path)!r}"
    if path.exists() and not path.is_dir():
        raise UserError(f"{shown} is a file; choose a folder path")
    for source in inputs:
        resolved, target = Path(source).resolve(), path.resolve()
        if resolved == target or target in resolved.parents:
            raise UserError(f"{shown} holds an input of this command ({source}); choose another folder")
    entries = sorted(os.listdir(path)) if path.is_dir() else []
    if entries:
        owner, names = _owner(path)
        foreign = sorted(set(entries) - {OWNER_FILE} - (names if owner is not None else set(own_names)))
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise UserError(
                f"{shown} already exists and holds files kumihimo did not write there ({listed}); an "
                "output folder is replaced whole, so choose a new or empty folder"
            )
        if owner is not None and owner != written_by:
            raise UserError(
                f"{shown} holds the output of `{owner}`, not of `{written_by}`; choose another folder"
            )
        if not replace:
            raise UserError(
                f"{shown} already exists and is not empty; choose another folder"
                + (f" or {replace_hint}" if replace_hint else "")
            )
    try:  # the staging folder is made beside the output: find out now, not after the work
        temp_dir(path.parent, f".{path.name}{TEMP_MARK}").rmdir()
    except OSError as exc:
        raise UserError(
            f"{shown} cannot be written ({why_unwritable(exc)}); choose a folder you can write to, "
            "or fix its permissions"
        ) from exc
    return path


@contextlib.contextmanager
def owned_output_folder(
    path: str | os.PathLike,
    key: str,
    written_by: str,
    *,
    replace: bool = True,
    replace_hint: str = "",
    own_names: Iterable[str] = (),
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Yield a staging folder beside `path`; when the block succeeds, mark it as `written_by`'s and
    put it in place of `path` by renames (an old output of the same command is moved aside first and
    deleted after), so `path` is at every moment either the old output or the complete new one, never
    a mix. `check_output_folder` rules what `path` may be; it runs before and again at the end."""
    path = Path(path)
    rules = dict(replace=replace, replace_hint=replace_hint, own_names=tuple(own_names), inputs=tuple(inputs))
    check_output_folder(path, key, written_by, **rules)
    staging = temp_dir(path.parent, f".{path.name}{TEMP_MARK}")
    try:
        yield staging
        record = {"written_by": written_by, "names": sorted(os.listdir(staging))}
        write_text_atomic(staging / OWNER_FILE, json.dumps(record) + "\n")
        check_output_folder(path, key, written_by, **rules)  # nobody put files there meanwhile
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}{TEMP_MARK}old-{os.getpid()}")
            os.replace(path, old)
        os.replace(staging, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _directories_once(base: str) -> tuple[list[str], int]:
    """`base` and every folder under it that `**` reaches (symbolic links followed, hidden folders
    skipped as glob does), each real folder once; and how many links led back to a folder already
    reached (a loop such as `sub/up -> ..`, or a second way to the same folder)."""
    found, seen, repeats = [], set(), 0
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in seen:
            repeats += 1
            continue
        seen.add((info.st_dev, info.st_ino))
        found.append(folder)
        try:
            names = sorted(os.listdir(folder), reverse=True)
        except OSError:
            continue
        stack.extend(
            os.path.join(folder, n)
            for n in names
            if not n.startswith(".") and os.path.isdir(os.path.join(folder, n))
        )
    return found, repeats


def _expand(pattern: str) -> tuple[list[str], int]:
    parts = Path(pattern).parts
    if "**" not in parts:
        return glob.glob(pattern), 0
    cut = parts.index("**")
    head, tail = os.path.join(*parts[:cut]) if cut else os.curdir, parts[cut + 1 :]
    bases = glob.glob(head) if glob.has_magic(head) else [head]
    paths, repeats = [], 0
    for base in bases:
        folders, loops = _directories_once(base)
        repeats += loops
        for folder in folders:
            more, loops = _expand(os.path.join(glob.escape(folder), *(tail or ("*",))))
            paths.extend(more)
            repeats += loops
    if cut == 0:
        paths = [os.path.relpath(p) if not os.path.isabs(p) else p for p in paths]
    return paths, repeats


def matching_files(pattern: str, key: str) -> list[str]:
    """The files `pattern` matches (glob syntax, `**` recursive, `~` expanded), sorted, each file
    once however many paths lead to it.

    `glob.glob` follows symbolic links into folders without noticing loops: `sub/up -> ..` with
    `**/*.jsonl` matched every file 41 times (until the path grew too long), so a corpus was read 41
    times, and two such links make the walk exponential. Here each real folder is entered once and
    each real file kept once; a link back to a folder already walked is reported on stderr."""
    paths, repeats = _expand(os.path.expanduser(pattern))
    unique: dict[str, str] = {}
    for path in sorted(paths, key=lambda p: (os.path.realpath(p) != os.path.abspath(p), p)):  # plain first
        if os.path.isfile(path):
            unique.setdefault(os.path.realpath(path), path)
    duplicates = sum(1 for p in paths if os.path.isfile(p)) - len(unique)
    if repeats or duplicates:
        print(
            f"[input] {key}: {pattern!r} reaches the same folders or files again through symbolic "
            f"links ({repeats} folder(s) reached twice, a loop such as sub/up -> .. or an alias); "
            "each file is read once",
            file=sys.stderr,
            flush=True,
        )
    return sorted(unique.values())

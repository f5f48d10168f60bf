"""The one exception type for problems a user can fix (bad config, missing file, bad input), and the
test for the one environment failure every stage reports the same way: a full disk.

The CLI prints a UserError's message as one line and exits with code 2, and a full disk likewise;
anything else is a bug and keeps its traceback.
"""

import errno


class UserError(ValueError):
    """Something the user can fix. The message says what was wrong and how to fix it."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether an exception (or one it wraps, as torch's checkpoint writer and PyTorch's C++ layer do)
    comes from a full disk or an exceeded quota."""
    return any(
        _is_out_of_space(e) or "No space left on device" in str(e) or "Disk quota exceeded" in str(e)
        for e in _chain(exc)
    )


def disk_full_message(exc: BaseException) -> str:
    """The one line for a stage that ran out of disk: where, and that a rerun carries on."""
    where = next(
        (e.filename for e in _chain(exc) if _is_out_of_space(e) and e.filename),
        None,
    )
    place, disk = (f" writing {where}", "that disk") if where else ("", "the disk this command writes to")
    return (
        f"disk full{place} ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); nothing "
        f"half-written was published: free space on {disk} and rerun the same command (it keeps the "
        "finished work and removes this run's temporary files)"
    )


def _is_out_of_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _chain(exc: BaseException):
    """`exc` and the exceptions it wraps (cause or context), each once."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__

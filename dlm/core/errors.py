"""The exception classes for what the user can fix."""

from __future__ import annotations

import errno
from pathlib import Path

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left, or the user's quota spent


class UserError(ValueError):
    """A bad option, file or destination that the user can fix: the command line prints its message
    as one line, with no traceback. Any other exception is a bug in dlm and shows its traceback."""


class DiskFullError(UserError):
    """A write of `size` bytes to `path` failed for want of space: the user frees some, it is not a
    bug. `what` says what was kept and how to go on (default: run the command again)."""

    def __init__(self, path: str | Path, size: int | None = None, what: str = ""):
        self.path, self.size = Path(path), size
        need = f" ({size / 1e6:.1f} MB)" if size else ""
        super().__init__(f"The disk holding '{self.path.parent}' is full: '{self.path.name}' could not be written"
                         f"{need}. {what or 'Free space on it (df -h shows what is left) and run the command again.'}")


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL

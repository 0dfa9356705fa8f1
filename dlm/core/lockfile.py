"""One writer per folder: an exclusive flock on a lock file, held for as long as a `with` block runs.
The kernel releases it when the process dies, so a killed writer never leaves a stale lock; the file
itself stays (it says who held it last)."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class FolderLocked(RuntimeError):
    """Another process holds the lock; `holder` says who."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class FolderLock:
    """`with FolderLock(path):` holds an exclusive lock on the file at `path` (its folder is created),
    or raises FolderLocked at once when another process holds it."""

    def __init__(self, path: str | Path):
        self.path, self.handle = Path(path), None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderLocked(holder) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()

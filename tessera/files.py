"""Files that are written whole or not at all.

Keys, the directory cache, backups and the restore-pending note all live in the home as small
files that a crash must never leave half-written: each is written to a temporary file beside it,
flushed to disk, and renamed over the old one (a rename is atomic), and the folder is flushed so
the rename itself survives a power cut.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

# One writer at a time per file in this process: two threads (a request and a background worker
# saving the same checkpoint, say) would share the temporary file, and the second rename fail.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(path: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(path.absolute()), threading.Lock())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: after a crash it holds the old content or the new, never
    part of either. The file is readable by its owner only; a missing folder is created (0700).
    Threads writing the same file take turns; the last to write wins."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    with _lock(path):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

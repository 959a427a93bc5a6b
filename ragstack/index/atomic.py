"""Crash-safe file replacement: write a temporary file beside the target, fsync it, rename it over the target.

``os.replace`` within one folder is atomic on POSIX, so the target is always either the old file or the new
one, complete; fsyncing the file before the rename and the folder after it makes the new content durable once
the call returns. A crash leaves at most a stray temporary file (named with :data:`TMP_PREFIX`), which the
owner of the folder removes.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, Callable

TMP_PREFIX = ".tmp-"


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` by what ``write`` writes to a binary file object, all or nothing."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def fsync_dir(path: Path) -> None:
    """Make the renames and creations in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

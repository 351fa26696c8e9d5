"""Files that survive a crash whole or not at all (the rules every writer here follows).

A file is written beside its final name, flushed and fsynced, renamed over the old one, and
the directory is fsynced so that the rename itself is durable. A crash at any moment leaves
either the previous file or the new one, never a mix; a leftover `<name>.partial` is ignored.
"""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """fsync the directory holding `path` (makes a create, rename or truncate durable)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new(path: str, data) -> None:
    """Create `path` (it must not exist) holding `data`, durably."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(path)


def replace_atomically(path: str, data, fsync: bool = True) -> int:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync of the directory).
    Returns the bytes written."""
    tmp = f"{path}.partial"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path)
    return len(data)

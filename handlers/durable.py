"""Files that survive a crash whole or not at all (the rules every writer here follows).

A file is written beside its final name, flushed and fsynced, renamed over the old one, and
the directory is fsynced so that the rename itself is durable. A crash at any moment leaves
either the previous file or the new one, never a mix; a leftover `<name>.partial` is ignored.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager


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


def copy_new(src: str, dst: str) -> int:
    """Copy `src` to a new file `dst` (it must not exist), durably; returns the bytes copied.
    Streams: a large log is not read into memory for its backup."""
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
        size = fout.tell()
    fsync_dir(dst)
    return size


def truncate_durably(path: str, at: int) -> None:
    """Cut `path` to `at` bytes and fsync it (the new size is durable)."""
    with open(path, "r+b") as fh:
        fh.truncate(at)
        os.fsync(fh.fileno())


@contextmanager
def atomic_writer(path: str, fsync: bool = True):
    """A file handle whose contents replace `path` atomically when the block ends (temp file,
    fsync, rename, fsync of the directory); an exception leaves `path` as it was."""
    tmp = f"{path}.partial"
    with open(tmp, "wb") as fh:
        yield fh
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path)


def replace_atomically(path: str, data, fsync: bool = True) -> int:
    """Write `data` to `path` atomically (see atomic_writer). Returns the bytes written."""
    with atomic_writer(path, fsync) as fh:
        fh.write(data)
    return len(data)

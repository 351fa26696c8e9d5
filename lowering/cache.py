"""On-disk cache of compiled kernels, keyed by everything that decides the binary.

Key: the IR text, target, arch, toolchain version, compile options and a fingerprint of the
lowering code itself, so an edit to a template can never serve a stale binary. Writes go to
a temporary file renamed into place: a crash never leaves a torn entry.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache


def cache_dir() -> str:
    return os.environ.get("CONCORDIA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "concordia", "kernels")


@lru_cache(maxsize=1)
def lowering_fingerprint() -> str:
    h = hashlib.sha256()
    root = os.path.dirname(__file__)
    for sub, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith((".py", ".j2", ".h")):
                with open(os.path.join(sub, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


def cache_key(*parts: str) -> str:
    h = hashlib.sha256(lowering_fingerprint().encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()


class KernelCache:
    def __init__(self, directory: str | None = None):
        self.dir = directory or cache_dir()

    def path(self, key: str, ext: str) -> str:
        return os.path.join(self.dir, key[:2], f"{key}.{ext}")

    def get(self, key: str, ext: str) -> bytes | None:
        try:
            with open(self.path(key, ext), "rb") as fh:
                return fh.read()
        except OSError:
            return None

    def put(self, key: str, ext: str, data: bytes) -> None:
        path = self.path(key, ext)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only or full cache directory only costs a recompile

"""Regions: named device buffers under checkpoint, split into pages."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from concordia_ir.errors import ConcordiaError
from concordia.backends.runtime import DeviceBuffer


@dataclass
class Region:
    id: int
    name: str
    buffer: DeviceBuffer
    page_size: int

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def n_words(self) -> int:
        return self.nbytes // 4

    @property
    def words_per_page(self) -> int:
        return self.page_size // 4

    @property
    def n_pages(self) -> int:
        return -(-self.nbytes // self.page_size)

    def words(self) -> DeviceBuffer:
        """The region's bytes as 32-bit words: what the handlers operate on."""
        return self.buffer.view(np.uint32)

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "dtype": self.buffer.dtype.str,
                "size": self.buffer.size, "nbytes": self.nbytes, "page_size": self.page_size}

    def content_hash(self) -> str:
        """SHA-256 of the region's bytes (copies the region to the host)."""
        return hashlib.sha256(self.buffer.numpy().tobytes()).hexdigest()


def check_region(name: str, buf, page_size: int, runtime) -> None:
    if not isinstance(buf, DeviceBuffer):
        raise ConcordiaError(f"region {name!r} must be a device buffer (rt.to_device(...) or "
                             f"rt.from_dlpack(tensor)), got {type(buf).__name__}")
    if buf.runtime is not runtime:
        raise ConcordiaError(f"region {name!r} lives on another runtime ({buf.runtime.spec})")
    if buf.nbytes == 0 or buf.nbytes % 4:
        raise ConcordiaError(f"region {name!r} has {buf.nbytes} bytes; regions need a positive "
                             "multiple of 4 bytes")
    if page_size < 4 or page_size % 4 or page_size & (page_size - 1):
        raise ConcordiaError(f"page_size must be a power of two >= 4 bytes, got {page_size}")

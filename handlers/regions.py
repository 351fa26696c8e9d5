"""Regions: named device buffers under checkpoint, split into pages."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from concordia_ir.errors import ConcordiaError
from concordia.backends.runtime import DeviceBuffer

from . import kernels as hk


@dataclass(frozen=True)
class CheckpointStats:
    checkpoint_id: int
    pages: int
    bytes: int
    seconds: float
    full: bool
    scan_seconds: float = 0.0


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

    def page_bytes(self, page: int) -> int:
        """Bytes of `page` inside the region (the last page may be short)."""
        return min(self.page_size, self.nbytes - page * self.page_size)

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


class PageStager:
    """The one path by which a region's pages leave the device (checkpoints and snapshots):
    the page gatherer copies the listed pages into a device staging buffer, a batch at a time,
    and the host reads each batch. A backend's native page ops (tiles) run instead where given."""

    def __init__(self, rt, region: Region, batch_bytes: int, native=None):
        n = region.n_pages
        self.rt, self.region, self.native = rt, region, native
        self.batch = max(1, min(n, batch_bytes // region.page_size))
        # the page list on the device (scanners write it too) and the staging, made at first
        # use: a region whose pages a host scanner lists and whose base is read at once may
        # never need them (the Hugging Face guard's 58 regions: 116 allocations at its start)
        self._pages = self._staging = None
        self.listed: np.ndarray | None = None   # what self.pages holds right now

    @property
    def pages(self) -> DeviceBuffer:
        if self._pages is None:
            self._pages = self.rt.empty(self.region.n_pages, np.int32)
        return self._pages

    @property
    def staging(self) -> DeviceBuffer:
        if self._staging is None:
            self._staging = self.rt.empty(self.batch * self.region.words_per_page, np.uint32)
        return self._staging

    def upload(self, pages: np.ndarray):
        """Put the (sorted) page list on the device, unless it is there already."""
        if self.listed is None or not np.array_equal(self.listed, pages):
            self.pages.write_prefix(pages.astype(np.int32))
            self.listed = pages

    def batches(self, pages: np.ndarray, shadow: DeviceBuffer | None = None, update: bool = False):
        """Yield (the batch's pages, their bytes as one uint8 array, whole pages). With
        `update`, the gatherer also copies each page into `shadow`."""
        r = self.region
        if self.native is not None:
            for first in range(0, len(pages), self.batch):
                part = pages[first:first + self.batch]
                yield part, self.native.gather(r.words().handle, shadow.handle, r.nbytes, part, update)
            return
        gather = hk.page_gatherer(r.words_per_page, r.n_words)
        self.upload(pages)
        # without update the gatherer never writes its shadow argument: staging stands in
        target = shadow if shadow is not None else self.staging
        for first in range(0, len(pages), self.batch):
            n = min(self.batch, len(pages) - first)
            self.rt.launch(gather, global_size=n * hk.GROUP, local_size=hk.GROUP,
                           args=(r.words(), target, self.pages, self.staging, first, int(update)))
            yield pages[first:first + n], self.staging.read(n * r.words_per_page).view(np.uint8)

    def pieces(self, pages: np.ndarray, shadow: DeviceBuffer | None = None, update: bool = False):
        """Yield (page index, its bytes), the region's last page trimmed to its end."""
        r = self.region
        for part, raw in self.batches(pages, shadow, update):
            for k, p in enumerate(int(x) for x in part):
                yield p, raw[k * r.page_size:k * r.page_size + r.page_bytes(p)].tobytes()

    def free(self):
        for buf in (self._pages, self._staging):
            if buf is not None:
                self.rt.free(buf)

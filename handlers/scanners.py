"""Region scanners that know their data: which pages changed, without reading the region.

A Checkpointer takes one per region (`scanners={"kv": KVBlockScanner(...)}`); a region with
none is scanned on the device by the Checkpointer's mode (shadow / hash / tracked).
"""
from __future__ import annotations

import math

import numpy as np

from . import kernels as hk


def pages_touched(start: np.ndarray, nbytes: int, page_size: int) -> np.ndarray:
    """The sorted pages that byte ranges [start, start + nbytes) touch."""
    if page_size % nbytes == 0:   # the common case (a 2 KiB slot of a 4 KiB page): one page each
        return np.unique(start // page_size).astype(np.int32)
    first = start // page_size
    last = (start + nbytes - 1) // page_size
    span = int((last - first).max()) + 1
    pages = first[:, None] + np.arange(span)[None, :]
    return np.unique(pages[pages <= last[:, None]]).astype(np.int32)


def row_page_size(row_bytes: int) -> int:
    """The log's page for a cache written a row of `row_bytes` at a time: the largest power of
    two not above a row, from 256 B (smaller pages make a base image of too many pages) to
    4 KiB. A page of about a row logs what a decode step wrote, not the rows around it: at
    batch 8 on an H100, Qwen3-0.6B's 2 KiB rows in 4 KiB pages logged 1.84 MB a step, in 2 KiB
    pages 0.92 MB, and the capture's gather over the bus fell by 41 % (profile_async --trace;
    bench/results/profile_async-trace-h100.json)."""
    return max(256, min(4096, 1 << (max(1, row_bytes).bit_length() - 1)))


class KVBlockScanner:
    """Dirty pages of a paged KV cache, from the decode loop's own writes.

    The cache is one tensor of shape (layers, 2, blocks, block_size, kv_heads, head_dim): a
    decode step writes one slot (block, position in block) per sequence, in every layer, for K
    and V. `mark(blocks, slots)` records those slots (the block table gives the block);
    `dirty_pages()` turns them into the pages that hold them — O(tokens written since the last
    checkpoint), no pass over the cache, however long the contexts are.
    """

    def __init__(self, shape: tuple, itemsize: int, page_size: int = 4096):
        self.layers, self.two, self.blocks, self.block_size = shape[:4]
        self.slot_bytes = int(np.prod(shape[4:])) * itemsize
        self.page_size = page_size
        self.pending: list[np.ndarray] = []
        # first slot index of each (layer, K/V) plane
        self.plane_base = (np.arange(self.layers * self.two, dtype=np.int64) * self.blocks)[:, None]

    def mark(self, blocks, slots) -> None:
        """Slots written by one step: arrays of block ids and in-block positions (one per
        sequence); every layer and both K and V are written there."""
        b = np.asarray(blocks, np.int64).reshape(1, -1)
        s = np.asarray(slots, np.int64).reshape(1, -1)
        self.pending.append(((self.plane_base + b) * self.block_size + s).reshape(-1))

    def dirty_pages(self) -> np.ndarray:
        if not self.pending:
            return np.zeros(0, np.int32)
        slots = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        return pages_touched(slots * self.slot_bytes, self.slot_bytes, self.page_size)

    def committed(self) -> None:
        self.pending.clear()


class AdapterPageScanner:
    """Adapter weights (LoRA factors) change rarely, and through any code path (a hot-swap, an
    optimiser step), so no host record of writes is trustworthy: their pages are compared with
    a device shadow copy by the shadow DirtyPageScanner, one work-group per page, where they
    live. A region scanned this way costs a shadow copy of its size on the device."""

    device_scan = "shadow"


class SequenceCacheScanner:
    """Dirty pages of a contiguous KV cache of shape (batch, heads, max_len, head_dim), such as
    a Hugging Face StaticCache layer: `mark(first, last)` records the positions a step wrote
    (every sequence and head); `dirty_pages()` gives the pages that hold them.

    Every layer's keys and values have one shape and are written at the same positions, so one
    scanner serves them all (`users` regions): it computes the list once a checkpoint and
    forgets the marks when the last of its users has committed."""

    def __init__(self, shape: tuple, itemsize: int, page_size: int = 4096, users: int = 1,
                 positions_a_step: int = 1, zero_unmarked: bool = False):
        self.batch, self.heads, self.max_len, self.head_dim = shape
        # the cache holds zeros at every position never marked (a fresh or reset StaticCache):
        # a base image then reads only the positions marked so far (base_pages)
        self.zero_unmarked, self.high = zero_unmarked, -1
        self.row_bytes = self.head_dim * itemsize
        self.page_size = page_size
        self.rows = (np.arange(self.batch * self.heads, dtype=np.int64) * self.max_len)[:, None]
        self.pending: list[np.ndarray] = []
        self.users, self.commits, self.pages = users, 0, None
        # pages one step (`positions_a_step` positions: a checkpoint's worth) touches at most.
        # checkpoint_async sizes its staging by it; a longer list is checkpointed at once. Rows
        # start at multiples of row_bytes, so within a page at multiples of g = gcd(row, page):
        # a run starting at page - g reaches furthest (the guard's rows are its pages: one
        # each, where a bound of ceil(row / page) + 1 counted two, staging twice the memory)
        run = max(1, positions_a_step) * self.row_bytes
        g = math.gcd(self.row_bytes, page_size)
        self.pages_a_step = self.batch * self.heads * -(-(run + page_size - g) // page_size)

    def mark(self, first: int, last: int) -> None:
        """Positions first..last (inclusive) were written."""
        pos = np.arange(first, last + 1, dtype=np.int64)[None, :]
        self.pending.append(((self.rows + pos) * self.row_bytes).reshape(-1))
        self.pages = None
        self.high = max(self.high, last)

    def base_pages(self) -> np.ndarray | None:
        """With zero_unmarked, the pages a base image must hold: those of the positions
        marked so far (from 0), the rest being zeros; else None (every page)."""
        if not self.zero_unmarked:
            return None
        if self.high < 0:
            return np.zeros(0, np.int64)
        starts = ((self.rows + np.arange(self.high + 1)[None, :]) * self.row_bytes).reshape(-1)
        return pages_touched(starts, self.row_bytes, self.page_size)

    def dirty_pages(self) -> np.ndarray:
        if self.pages is None:
            if not self.pending:
                return np.zeros(0, np.int32)
            self.pages = pages_touched(np.concatenate(self.pending), self.row_bytes, self.page_size)
        return self.pages

    def committed(self) -> None:
        self.commits += 1
        if self.commits >= self.users:
            self.pending.clear()
            self.pages, self.commits = None, 0


class BlockTableScanner:
    """KVBlockScanner's pages, listed on the device from the block table itself: the decode
    loop's device tensors `table` (int64, batch x max_blocks) and `pos` (int64, the position
    the last step wrote) name the slots, so the host computes nothing per step and a graph
    can hold the listing. The device remembers where the last list ended (`last`), so a
    checkpoint that was coalesced into the next loses nothing.

    The cache is (planes..., blocks, block_size, rows...) as for KVBlockScanner; a slot's row
    must divide the page size (a slot never straddles two pages)."""

    def __init__(self, shape: tuple, itemsize: int, table, pos, batch: int, page_size: int = 4096):
        layers, two, self.blocks, self.block_size = shape[:4]
        self.planes = layers * two
        self.row_bytes = int(np.prod(shape[4:])) * itemsize
        if page_size % self.row_bytes:
            raise ValueError(f"a KV slot of {self.row_bytes} bytes does not divide the "
                             f"{page_size}-byte page: use KVBlockScanner")
        self.batch, self.max_blocks = batch, table.size // batch
        self.rt, self.table, self.pos, self.page_size = table.runtime, table, pos, page_size
        self.last = self.rt.zeros(1, np.int64)
        self.device_lister = True
        # a page holds one slot: the pages a list names are not written by the steps after it
        # (they write later positions), so a gather may run beside them (ring_gather)
        self.append_only = page_size == self.row_bytes

    def kernels(self, capacity: int):
        """(list kernel, its work-groups of 64, advance kernel) for a list of `capacity`."""
        lister = hk.block_table_lister(self.planes, self.blocks, self.block_size, self.batch,
                                       self.max_blocks, self.row_bytes, self.page_size, capacity)
        groups = -(-self.planes * self.batch // 64)
        return lister, groups, hk.block_table_advance(self.planes, self.batch)

    def dirty_pages(self) -> np.ndarray:
        """The same list through ordinary launches, read back (synchronous checkpoints)."""
        cap = self.blocks * self.block_size * self.planes   # every slot: a bound no list passes
        pages, count = self.rt.empty(cap, np.int32), self.rt.zeros(1, np.int32)
        lister, groups, advance = self.kernels(cap)
        self.rt.launch(lister, groups * 64, 64, (self.table, self.pos, self.last, pages))
        self.rt.launch(advance, 1, 1, (self.pos, self.last, count))
        n = min(int(count.numpy()[0]), cap)
        out = np.unique(pages.read(n)) if n else np.zeros(0, np.int32)
        self.rt.free(pages)
        self.rt.free(count)
        return out.astype(np.int32)

    def start_at(self, position: int) -> None:
        """The next list starts at `position` (a run resumed there: earlier ones are logged)."""
        self.last.write(np.array([position], np.int64))

    def committed(self) -> None:
        """Nothing: the device moved `last` when it listed (a full checkpoint leaves it, so the
        next list repeats a few pages the base image holds already: harmless)."""


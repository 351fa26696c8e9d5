"""Checkpointer: delta checkpoints of device regions into a DeltaLog, and restore on any backend.

Modes (how dirty pages are found; all run as IR handlers on the region's own device):
- "shadow" (default): compare with a device copy of the last checkpoint. Exact and the
  fastest scan, at the price of doubling the region's device memory.
- "hash": compare 64-bit per-page hashes (8 bytes per page). For regions too large to
  shadow; a changed page goes unnoticed only on a hash collision (~2^-64 per page).
- "tracked": kernels launched through `Checkpointer.launch` are instrumented to set a dirty
  flag per page they store to, so a checkpoint costs O(dirty pages). Writes made any other
  way are invisible to it: use this mode only when every writer goes through `launch`.
`checkpoint()` must be called while no kernel writes the regions (between launches).
"""
from __future__ import annotations

import hashlib
import sys
import time

import numpy as np

from concordia_ir.errors import ConcordiaError
from concordia_ir.types import scalar_for_dtype
from concordia.backends.runtime import DeviceBuffer, _as_kernel

from . import kernels as hk
from .log import DeltaLog, committed_image, compact, scan_log
from .async_checkpoint import CheckpointHandle, CheckpointWriter, check_device_side, check_ring
from .regions import CheckpointStats, PageStager, Region, check_region
from concordia_ir.passes.tracking import instrument_stores

MODES = ("shadow", "hash", "tracked")
STAGING_BYTES = 4 << 20   # pages gathered per round trip to the host
WHOLE_READ_BYTES = 64 << 20   # a base image's whole-region reads held at once, at most
MERGE_GAP = 32 << 10   # a base image reads two spans this close as one (their gap is zeros)
ASYNC_BASE_BYTES = 64 << 20   # checkpoint_async's base image, read and handed to the writer, at most


def _read_whole(st) -> bool:
    """A base image reads the region whole: no shadow to update and one staging batch's
    worth (no page list to upload, no gather: the guard's first call did both 58 times)."""
    return st.mode != "shadow" and st.region.nbytes <= STAGING_BYTES


def _base_spans(st, memo: dict) -> list | None:
    """The [first, end) page spans a base image reads of a host-listed region whose scanner
    names the pages that may hold anything but zeros (base_pages: a Hugging Face guard's
    cache, the positions written so far, where it read the whole cache, mostly zeros: 32 MB
    and 36-47 ms of its first call at 256 tokens on an H100); None: the whole region. Spans
    less than MERGE_GAP apart are read as one (a read costs more than that many zeros); a
    scanner's spans are worked out once (the guard's 56 KV regions share one: 7 ms of its
    first call when each worked them out)."""
    key = (id(st.scanner), st.region.n_pages, st.region.page_size)
    if key not in memo:
        listed = st.scanner.base_pages() if hasattr(st.scanner, "base_pages") \
            and st.mode == "host" and st.rt.backend.parts else None
        if listed is None:
            memo[key] = None
        else:
            pages = np.unique(np.asarray(listed, np.int64))
            cuts = np.flatnonzero(np.diff(pages) * st.region.page_size > MERGE_GAP) + 1
            memo[key] = [(int(run[0]), int(run[-1]) + 1) for run in np.split(pages, cuts) if run.size]
    if memo[key] is None:
        return [(0, st.region.n_pages)] if _read_whole(st) else None
    return memo[key]


class _WholeReads:
    """A base image's reads of whole regions or of their spans (_base_spans), in groups of
    up to WHOLE_READ_BYTES (a span cut at STAGING_BYTES), one wait for the device a group: a
    read each waited twice a region (the guard's 58: ~5 ms of its first call on an H100)."""

    def __init__(self, rt, states: list):
        self.rt, self.groups, self.ready, self.done = rt, [], {}, 0
        self.last: dict[int, int] = {}   # id(state) -> the last group holding its spans
        self.nbytes = 0                    # what the reads bring to the host
        size, memo = WHOLE_READ_BYTES, {}
        for st in states:
            spans = _base_spans(st, memo)
            step = max(1, STAGING_BYTES // st.region.page_size)
            for first, end in spans or ():
                for at in range(first, end, step):
                    nbytes = (min(end, at + step) - at) * st.region.page_size
                    if size + nbytes > WHOLE_READ_BYTES:
                        self.groups.append([])
                        size = 0
                    self.groups[-1].append((st, at, min(end, at + step)))
                    size += nbytes
                    self.nbytes += nbytes
                    self.last[id(st)] = len(self.groups) - 1
            if spans is not None and id(st) not in self.last:   # nothing to read: all zeros
                self.last[id(st)] = -1

    def covers(self, st) -> bool:
        return id(st) in self.last

    def take(self, st) -> list:
        """The region's spans as (first page, bytes of whole pages from it; a short last page
        padded with zeros), reading the groups that hold them (in the states' order)."""
        while self.done <= self.last[id(st)]:
            reads = []
            for s, first, end in self.groups[self.done]:
                r, wpp = s.region, s.region.words_per_page
                raw = np.zeros((end - first) * r.page_size, np.uint8)
                count = min((end - first) * wpp, r.n_words - first * wpp)
                words = r.words() if count == r.n_words else r.words().part(first * wpp, count)
                reads.append((words, raw.view(np.uint32)[:count]))
                self.ready.setdefault(id(s), []).append((first, raw))
            self.rt.read_into(reads)
            self.done += 1
        return self.ready.pop(id(st), [])


class _RegionState:
    """Device-side bookkeeping of one region: shadow / hashes / flags, the dirty list, staging.
    A region with a host scanner (scanners.KVBlockScanner) takes its dirty pages from it."""

    def __init__(self, rt, region: Region, mode: str, scanner=None):
        device_scan = getattr(scanner, "device_scan", None)
        if device_scan is not None:   # a scanner that names a device scan (AdapterPageScanner)
            mode, scanner = device_scan, None
        elif scanner is not None:
            mode = "host"
        self.rt, self.region, self.mode, self.scanner = rt, region, mode, scanner
        self.native = rt.backend.page_ops(region.page_size) if mode == "shadow" else None
        n = region.n_pages
        self.stager = PageStager(rt, region, STAGING_BYTES, self.native)
        # only what the mode uses: a host-listed region needs none of it (the Hugging Face
        # guard's 58 regions made 116 buffers and 58 synchronous writes for nothing)
        self.count = rt.zeros(1, np.int32) if mode != "host" else None
        self.shadow = rt.empty(region.n_words, np.uint32) if mode == "shadow" else None
        self.hashes = rt.zeros(2 * n, np.uint32) if mode == "hash" else None
        self.flags = rt.zeros(n, np.int32) if mode == "tracked" else None

    def find_dirty(self) -> np.ndarray:
        r, rt = self.region, self.rt
        if self.native is not None:   # the backend's own form of the shadow scan (tiles)
            self.stager.listed = self.native.scan(r.words().handle, self.shadow.handle, r.nbytes)
            return self.stager.listed
        if self.mode == "host":
            return np.asarray(self.scanner.dirty_pages(), dtype=np.int32)
        self.count.write(np.zeros(1, np.int32))
        if self.mode == "shadow":
            rt.launch(hk.page_scanner(r.words_per_page, r.n_words), global_size=r.n_pages * hk.GROUP,
                      local_size=hk.GROUP, args=(r.words(), self.shadow, self.stager.pages, self.count))
        elif self.mode == "hash":
            rt.launch(hk.page_hasher(r.words_per_page, r.n_words), global_size=r.n_pages * hk.GROUP,
                      local_size=hk.GROUP, args=(r.words(), self.hashes, self.stager.pages, self.count))
        elif self.mode == "tracked":
            n = r.n_pages
            rt.launch(hk.flag_collector(), global_size=-(-n // 256) * 256, local_size=256,
                      args=(self.flags, self.stager.pages, self.count, n))
        k = int(self.count.numpy()[0])
        found = self.stager.pages.read(k)
        self.stager.listed = found
        return np.sort(found)

    def gather(self, pages: np.ndarray):
        """Yield (page index, bytes) for the listed pages (a shadow scan updates its shadow)."""
        return self.stager.pieces(pages, self.shadow, update=self.mode == "shadow")

    def free(self):
        """Give back its device memory (the region itself is the caller's)."""
        for buf in (self.count, self.shadow, self.hashes, self.flags):
            if buf is not None:
                self.rt.free(buf)
        self.stager.free()

    def after_commit(self, pages: np.ndarray):
        if self.scanner is not None:
            self.scanner.committed()
        if self.mode == "tracked" and len(pages):
            self.stager.upload(pages)
            self.rt.launch(hk.flag_clearer(), global_size=-(-len(pages) // 256) * 256,
                           local_size=256, args=(self.flags, self.stager.pages, len(pages)))


class Checkpointer:
    """Delta checkpoints of named device regions into an append-only log.

    >>> ckpt = Checkpointer(rt, {"kv": kv}, "state.clog", page_size=4096)
    >>> ckpt.checkpoint()            # first: full base image
    >>> stats = ckpt.checkpoint()    # then only dirty pages: stats.pages, stats.bytes
    >>> regions = Checkpointer.restore("state.clog", Runtime("reference"))
    """

    def __init__(self, runtime, regions: dict, path: str, page_size: int = 4096,
                 mode: str = "shadow", fsync: str = "always", scanners: dict | None = None,
                 ring_slots: int = 4, slot_bytes: int = 16 << 20, when_full: str = "wait",
                 compact_at_bytes: int | None = None, device_side: str = "auto"):
        if mode not in MODES:
            raise ConcordiaError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        check_ring(ring_slots, when_full, device_side)
        if not regions:
            raise ConcordiaError("a Checkpointer needs at least one region")
        self.rt, self.path, self.mode, self.page_size = runtime, path, mode, page_size
        self.regions: list[Region] = []
        for i, (name, buf) in enumerate(regions.items()):
            check_region(name, buf, page_size, runtime)
            self.regions.append(Region(i, name, buf, page_size))
        self.layout = {"format": "concordia-regions/1", "page_size": page_size,
                       "regions": [r.describe() for r in self.regions]}
        self.log = DeltaLog(path, fsync)
        if self.log.layout is not None and not _same_layout(self.log.layout, self.layout):
            self.log.close()
            raise ConcordiaError(f"{path}: the log was written for other regions "
                                 f"({_layout_text(self.log.layout)}), not {_layout_text(self.layout)}")
        self.checkpoint_id = self.log.last_checkpoint
        scanners = scanners or {}
        unknown = set(scanners) - {r.name for r in self.regions}
        if unknown:
            raise ConcordiaError(f"scanners for unknown regions: {', '.join(sorted(unknown))}")
        self.states = [_RegionState(runtime, r, mode, scanners.get(r.name)) for r in self.regions]
        try:
            self.device_side = device_side = check_device_side(runtime, self.states, device_side)
        except ConcordiaError:
            self.log.close()
            raise
        if runtime.backend.streams:   # recovery's scatter built now, into the disk cache: a
            # recovery on this machine loads it (its first compile took ~160 ms of an H100
            # recovery's apply, profiled)
            # (one per page and region size: the guard's 56 same-shaped KV tensors share one)
            for shape in {(r.words_per_page, r.n_words) for r in self.regions}:
                runtime.backend.prebuild(_as_kernel(hk.page_scatterer(*shape)))
        self.need_full = True
        self._tracked: dict = {}
        # checkpoint_async's staging ring and writer thread, made by its first call
        self._ring = dict(slots=ring_slots, slot_bytes=slot_bytes, when_full=when_full,
                          compact_at_bytes=compact_at_bytes, device_side=device_side)
        self._writer: CheckpointWriter | None = None
        self.closed = False

    # -- checkpoints
    def checkpoint(self, content_hash: bool = False, _plan: "_WholeReads | None" = None) -> CheckpointStats:
        """Log the pages changed since the last checkpoint (all pages the first time) and commit.
        With content_hash, the commit also records each region's SHA-256 (a full read).
        (_plan: a base image's reads planned already, by checkpoint_async.)"""
        self._check_open()
        if self._writer is not None:
            self._writer.flush()   # commits stay in checkpoint order
        t0 = time.perf_counter()
        full = self.need_full
        self.need_full = True   # stays set if anything below fails: the next one is full
        if full:
            self.log.write_layout(self.layout)   # a full base image starts after a layout record
        pages_logged, bytes_logged, scan_s, dirty_lists = 0, 0, 0.0, []
        whole = (_plan if _plan is not None else _WholeReads(self.rt, self.states)) if full else None
        for st in self.states:
            r = st.region
            ts = time.perf_counter()
            if full:
                if st.mode == "hash":
                    st.find_dirty()             # prime the stored hashes
                pages = np.arange(r.n_pages, dtype=np.int32)
            else:
                pages = st.find_dirty()
            scan_s += time.perf_counter() - ts
            dirty_lists.append(pages)
            n, nbytes = self._log_base(st, pages, whole) if full else self._log_delta(st, pages)
            pages_logged, bytes_logged = pages_logged + n, bytes_logged + nbytes
        self.checkpoint_id += 1
        info = self.log.commit_info(self.checkpoint_id, pages_logged, bytes_logged, full,
                                    str(self.rt.spec))
        if content_hash:
            info["sha256"] = {r.name: r.content_hash() for r in self.regions}
        self.log.commit(self.checkpoint_id, info)
        if self._writer is not None:   # durable_id and flush() count this one too
            self._writer.synced(self.checkpoint_id)
        for st, pages in zip(self.states, dirty_lists):
            st.after_commit(pages)
        self.need_full = False
        return CheckpointStats(self.checkpoint_id, pages_logged, bytes_logged,
                               time.perf_counter() - t0, full, scan_s)

    def _log_delta(self, st, pages: np.ndarray) -> tuple[int, int]:
        """A region's listed pages into the log, as (page, bytes) pieces; (pages, bytes)."""
        sizes = []

        def logged():
            for p, data in st.gather(pages):
                sizes.append(len(data))
                yield p, data
        return self.log.append_pages(st.region.id, st.region.page_size, logged()), sum(sizes)

    def _log_base(self, st, pages: np.ndarray, whole: _WholeReads) -> tuple[int, int]:
        """Every page of a region into the log, a staging batch at a time as arrays (a
        Hugging Face guard's first call logged 122,000 pages one at a time: 0.1-0.4 s on an
        H100), its pages of zeros left out; (pages, bytes). A shadow scan's shadow is
        updated on the way, as for a delta."""
        r, n, nbytes = st.region, 0, 0
        if whole.covers(st):
            return self.log.append_base(r.id, r.page_size, whole.take(st), r.nbytes)
        for part, raw in st.stager.batches(pages, st.shadow, update=st.mode == "shadow"):
            k, b = self.log.append_base(r.id, r.page_size, [(int(part[0]), raw[:len(part) * r.page_size])],
                                        r.nbytes)
            n, nbytes = n + k, nbytes + b
        return n, nbytes

    def checkpoint_async(self, stream=None) -> CheckpointHandle:
        """Enqueue a checkpoint of the regions as they are at this point of `stream` (a torch
        stream or a raw CUstream; default: torch's current stream on cuda) and return at once;
        a writer thread logs it, commits and fsyncs (group commit). handle.result() waits for
        durability; flush() for every checkpoint so far; durable_id names the last durable
        one. The first checkpoint is the full base image: read before this returns, and, where
        it is at most ASYNC_BASE_BYTES read whole, appended and committed by the writer like
        the rest (else written before this returns). See handlers/async_checkpoint.py for
        what runs where."""
        self._check_open()
        plan = _WholeReads(self.rt, self.states) if self.need_full else None
        base = plan if plan is not None and self._small_base(plan) else None
        if (self.need_full and base is None) or (self._writer is not None and self._writer.overflows()):
            if self._writer is not None:
                self._writer.raise_error()
            stats = self.checkpoint(_plan=plan)   # a large base: its reads planned once
            h = CheckpointHandle(stats.checkpoint_id)
            h._finish(stats, newest=stats.checkpoint_id)
            return h
        if self._writer is None:
            self._writer = CheckpointWriter(self, **self._ring)
        if base is not None:   # read now, appended and committed by the writer
            self._writer.raise_error()
            return self._writer.enqueue_base(self._read_base(base))
        b = self.rt.backend
        return self._writer.enqueue(_stream_handle(stream, int(b.device or 0)) if b.streams else None)

    def _small_base(self, plan: _WholeReads) -> bool:
        """Does the base image go to the writer: every region read whole or in spans, and
        they come to at most ASYNC_BASE_BYTES (a Hugging Face guard's: 2-9 MB)? (A larger
        base is written as it is read, a group at a time, not held in memory for the writer.)"""
        return all(plan.covers(st) for st in self.states) and plan.nbytes <= ASYNC_BASE_BYTES

    def _read_base(self, whole: _WholeReads) -> list:
        """Every region's base image read now, as (region, pieces) for the writer; the
        scanners are told, as a delta's capture tells them (_RegionState.after_commit)."""
        for st in self.states:
            if st.mode == "hash":
                st.find_dirty()   # prime the stored hashes
        out = [(st.region, whole.take(st)) for st in self.states]
        self.checkpoint_id += 1
        for st in self.states:
            st.after_commit(np.arange(st.region.n_pages, dtype=np.int32))
        self.need_full = False   # the writer's failure sets it again (raise_error)
        return out

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every checkpoint so far is durable; returns the last durable id."""
        return self._writer.flush(timeout) if self._writer is not None else self.checkpoint_id

    @property
    def durable_id(self) -> int:
        """The last checkpoint known durable (with fsync=always: on disk)."""
        return self._writer.durable_id if self._writer is not None else self.checkpoint_id

    # -- store-tracked launches
    def launch(self, kernel, global_size, local_size=64, args=()):
        """Launch `kernel`; in "tracked" mode its stores to regions also mark dirty pages."""
        if self.mode != "tracked":
            return self.rt.launch(kernel, global_size, local_size, args)
        k = _as_kernel(kernel)
        by_buffer = {id(r.buffer): (r, st) for r, st in zip(self.regions, self.states)}
        tracked = [(p.name, by_buffer[id(a)]) for p, a in zip(k.params, args)
                   if isinstance(a, DeviceBuffer) and id(a) in by_buffer]
        key = (id(k), tuple(name for name, _ in tracked))
        if key not in self._tracked:
            params = {p.name: p for p in k.params}
            epp = {name: r.page_size // params[name].type.elem.dtype.itemsize
                   for name, (r, _) in tracked}
            self._tracked[key] = (k, instrument_stores(k, epp))
        inst = self._tracked[key][1]
        return self.rt.launch(inst, global_size, local_size,
                              tuple(args) + tuple(st.flags for _, (_, st) in tracked))

    # -- lifecycle
    def _check_open(self) -> None:
        if self.closed:
            raise ConcordiaError(f"{self.path}: this Checkpointer is closed; open a new one "
                                 "on the log to go on")

    def close(self) -> None:
        """Wait for every checkpoint to be durable, then give back the log, the staging ring
        and the device memory of the regions' bookkeeping (a guard a generate call made
        and kept them all, pinned memory included)."""
        self.closed = True
        try:
            if self._writer is not None:
                writer, self._writer = self._writer, None
                writer.close()
        finally:
            self.log.close()
            for st in self.states:
                st.free()

    def compact(self) -> int:
        """Fold the log into one base image (crash-safe: write new, fsync, rename)."""
        self._check_open()
        self.flush()
        self.log.close()
        size = compact(self.path)
        self.log = DeltaLog(self.path, self.log.fsync)
        return size

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- recovery
    @staticmethod
    def restore(path: str, runtime, verify: bool = True,
                into: dict[str, DeviceBuffer] | None = None, image=None,
                checkpoint: int | None = None) -> dict[str, DeviceBuffer]:
        """The regions as of the log's last commit (or of commit `checkpoint`, an older one
        on purpose), rebuilt on `runtime` by the DeltaApplier: into new buffers, or into
        `into`'s buffers (e.g. a new process's own tensors, wrapped with rt.from_dlpack) where
        a region is named there. `image`: the log's committed image when the caller has read
        it already (committed_image(scan_log(path))). A log damaged mid-file is refused
        (LogError with the offset) unless `checkpoint` names a sound commit before the damage."""
        image = image if image is not None else committed_image(scan_log(path), checkpoint)
        out = {}
        for desc in image.layout["regions"]:
            buf = (into or {}).get(desc["name"])
            if buf is None:
                buf = _region_buffer(runtime, desc)
            elif (buf.dtype.str, buf.size) != (desc["dtype"], desc["size"]):
                raise ConcordiaError(f"{path}: region {desc['name']!r} was {desc['size']} x "
                                     f"{desc['dtype']}; the buffer to restore into is "
                                     f"{buf.size} x {buf.dtype.str}")
            region = Region(desc["id"], desc["name"], buf, image.layout["page_size"])
            held = int(image.present[region.id].sum())
            if held != region.n_pages:
                raise ConcordiaError(f"{path}: region {region.name!r} has {held} of "
                                     f"{region.n_pages} pages in the log (no full base image)")
            apply_image(runtime, region, image.rows[region.id].reshape(-1))
            if verify and "sha256" in image.info:
                got = region.content_hash()
                if got != image.info["sha256"][region.name]:
                    raise ConcordiaError(f"{path}: restored region {region.name!r} does not match "
                                         f"the committed hash")
            out[region.name] = buf
        return out


def _region_buffer(runtime, desc: dict) -> DeviceBuffer:
    """A new buffer for a logged region. Regions are bytes: a dtype kernels cannot take (a
    wrapped bfloat16 or float8 tensor's) comes back as its bytes seen with that dtype."""
    dtype = np.dtype(desc["dtype"])
    if scalar_for_dtype(dtype) is not None:
        return runtime.empty(desc["size"], dtype)
    return runtime.empty(desc["nbytes"] // 4, np.uint32).view(dtype)


def apply_pages(runtime, region: Region, pages: dict[int, bytes]) -> None:
    """DeltaApplier for logged pages (any subset of the region's pages)."""
    order = np.array(sorted(pages), dtype=np.int32)
    apply_image(runtime, region, b"".join(pages[int(p)] for p in order), order)


def apply_image(runtime, region: Region, raw, order: np.ndarray | None = None) -> None:
    """DeltaApplier: `raw` holds the pages listed in `order` (default: every page) back to back,
    only the region's last page may be short. They are staged on the device in large batches
    and scattered into the region there."""
    order = np.arange(region.n_pages, dtype=np.int32) if order is None else order
    n, wpp = len(order), region.words_per_page
    if n == 0:
        return
    native = runtime.backend.page_ops(region.page_size)
    if native is not None:   # the backend's own scatter (tile copies on Tenstorrent)
        native.scatter(region.words().handle, region.nbytes, order, np.frombuffer(raw, np.uint8))
        return
    batch = max(1, min(n, (64 << 20) // region.page_size))
    staging = runtime.empty(batch * wpp, np.uint32)
    plist = runtime.empty(n, np.int32)
    plist.write(order)
    scatter = hk.page_scatterer(wpp, region.n_words)
    if len(raw) == n * region.page_size:   # whole pages: use the bytes where they lie
        words = np.frombuffer(raw, np.uint32)
    else:
        padded = np.zeros(n * region.page_size, np.uint8)
        padded[:len(raw)] = np.frombuffer(raw, np.uint8)
        words = padded.view(np.uint32)
    for first in range(0, n, batch):
        k = min(batch, n - first)
        staging.write_prefix(words[first * wpp:(first + k) * wpp])
        runtime.launch(scatter, global_size=k * hk.GROUP, local_size=hk.GROUP,
                       args=(region.words(), plist, staging, first))
    runtime.synchronize()
    runtime.free(staging)
    runtime.free(plist)


def device_digest(runtime, buf: DeviceBuffer, page_size: int = 4096) -> str:
    """A content digest computed where the data is: the page hasher (an IR handler, bit-exact
    on every backend) hashes every page on the device at memory bandwidth; the host hashes only
    those per-page hashes. Guards against corruption in transit, not against an adversary."""
    if buf.nbytes % 4:
        return "sha256:" + hashlib.sha256(buf.numpy().tobytes()).hexdigest()
    region = Region(0, "d", buf, page_size)
    hashes = runtime.zeros(2 * region.n_pages, np.uint32)
    dirty = runtime.empty(region.n_pages, np.int32)
    count = runtime.zeros(1, np.int32)
    runtime.launch(hk.page_hasher(region.words_per_page, region.n_words),
                   global_size=region.n_pages * hk.GROUP, local_size=hk.GROUP,
                   args=(region.words(), hashes, dirty, count))
    h = hashes.numpy()
    for b in (hashes, dirty, count):
        runtime.free(b)
    return "pages:" + hashlib.sha256(h.tobytes() + str(buf.nbytes).encode()).hexdigest()


def _same_layout(a: dict, b: dict) -> bool:
    strip = lambda lay: (lay.get("page_size"), [(r["name"], r["dtype"], r["size"]) for r in lay["regions"]])
    return strip(a) == strip(b)


def _layout_text(layout: dict) -> str:
    return ", ".join(f"{r['name']}: {r['size']} x {r['dtype']}" for r in layout["regions"]) + \
        f"; pages of {layout.get('page_size')} B"


def _stream_handle(stream, device: int = 0):
    """A raw stream handle: torch streams give theirs; None is torch's current stream on
    `device` where torch has initialised CUDA, else the legacy default stream (0)."""
    if stream is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            # the raw handle, as Triton reads it: current_stream() builds a Stream object
            # (~25 us a checkpoint of the guard's, on the decode thread)
            return raw(device) if raw is not None else torch.cuda.current_stream(device).cuda_stream
        return 0
    return getattr(stream, "cuda_stream", stream)

"""Asynchronous, stream-ordered checkpoints: the caller's thread enqueues, a writer makes durable.

    handle = ckpt.checkpoint_async(stream)   # returns at once; the caller goes on writing
    ...
    handle.result()                           # this checkpoint is durable
    ckpt.flush(); ckpt.durable_id             # all of them; the last durable one

On a backend with streams and graphs (cuda), what the caller's thread does is enqueue, on the
caller's stream, one replay of a ring slot's graph: each region's page list (a host scanner's,
through pinned memory) or a device scan (shadow compare, the count left on the device), then a
gather of the listed pages into the slot's staging; then an event. The checkpoint therefore
holds the regions as they are at that point of the stream, whatever the caller enqueues after
it; the caller's thread makes no device synchronisation, no copy of region bytes and no file
I/O.

The writer thread waits for a slot's event and reads the pages where the gathers wrote them,
in host-mapped memory; it appends them to the log and commits; the checkpoints that are ready
share one fsync (group commit). The ring of slots is bounded: when every slot is in flight the next
checkpoint waits for one (backpressure: when_full="wait") or is coalesced into the next one
(when_full="coalesce": its pages stay dirty, the next checkpoint takes them, and its handle
resolves with that one; at most MAX_COALESCE in a row, then the caller waits: a staging slot
holds a bounded number of steps' pages). An error in the writer is raised by the next call, never lost; the
checkpoint after it is a full one.

On a backend without streams (reference, PoCL, the Tenstorrent simulator) the same call
captures the pages in the caller's thread (the regions are host memory or a blocking queue);
the log's I/O still goes to the writer. Regions in "hash" or "tracked" mode are captured that
way on every backend.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from concordia_ir.errors import ConcordiaError

from . import kernels as hk
from .compaction import BackgroundCompaction
from .regions import CheckpointStats
from .ring_gather import RingGather, check_eager_loading

WHEN_FULL = ("wait", "coalesce")
DEVICE_SIDES = ("stream", "ring")   # where a capture's gather runs (module docstring, ring_gather)
# checkpoints coalesced in a row at most where a host scanner lists pages; the next one waits
# for a slot. A coalesced step's pages wait for the next capture, and a staging slot holds a
# bounded number of steps' worth: unbounded coalescing overflowed it at batch 8. Where every
# list is the device's, the bound is what a slot holds (CheckpointWriter._coalesce_bound)
MAX_COALESCE = 3
# Records the writer appends between two releases of the GIL. A thread waiting for the GIL gets
# it only when the holder drops it, after up to sys.getswitchinterval() (5 ms) of pure Python:
# a decode thread back from its device wait would sit behind the writer for that long.
YIELD_EVERY = 16
# ... or bytes: a region's scatter record is one call whatever its size (its CRC and copy hold
# the GIL for its bytes); a yield after each region was one after each of the Hugging Face
# guard's 58 small regions, and each could wait a switch interval to get the GIL back
YIELD_BYTES = 256 << 10
# branches of a capture's graph at most: regions are independent, so their chains run side by
# side (a branch each was 2-3x faster at batch 1 with three regions), but each branch costs the
# graph's launch a fork and a join, on the caller's thread (the guard's 58 regions: 428 us)
MAX_BRANCHES = 8
# How long the writer holds a fresh capture back, waiting for the caller's next one (see _hold).
HOLD_S = 0.005
# Steps of pages a slot holds for a host scanner that says how many pages a step touches
# (pages_a_step): sized to the region instead, the Hugging Face guard's ring pinned 130 MB
# for 256 tokens and its second call took 0.14 s. A list longer than that is checkpointed
# at once (CheckpointWriter.overflows), never lost.
HOST_LIST_STEPS = 4 * (MAX_COALESCE + 1)


def check_device_side(rt, states, device_side: str) -> None:
    """device_side="ring" where it can run: a backend with streams and a resident kernel, and
    a region it may gather beside the stream (ring_gather's docstring)."""
    if device_side != "ring":
        return
    b = rt.backend
    if not (b.streams and b.graphs and b.resident_groups() is not None):
        raise ConcordiaError(f"device_side='ring' needs a backend with streams, graphs and a "
                             f"resident kernel (cuda); {b.name} has none")
    if not any(_ring_gathered(st) for st in states):
        raise ConcordiaError("device_side='ring' gathers only regions whose pages the steps after "
                             "a checkpoint do not write: a BlockTableScanner's KV cache with one "
                             "slot a page (none here)")
    check_eager_loading()


def check_ring(slots: int, when_full: str, device_side: str = "stream") -> None:
    """The staging ring's settings, checked where the user gives them (Checkpointer)."""
    if device_side not in DEVICE_SIDES:
        raise ConcordiaError(f"device_side must be one of {', '.join(DEVICE_SIDES)}, "
                             f"got {device_side!r}")
    if when_full not in WHEN_FULL:
        raise ConcordiaError(f"when_full must be one of {', '.join(WHEN_FULL)}, got {when_full!r}")
    if not isinstance(slots, int) or slots < 1:
        raise ConcordiaError(f"the staging ring needs at least 1 slot, got {slots!r}")


class CheckpointHandle:
    """One asynchronous checkpoint. `result()` waits until it is durable and returns its
    CheckpointStats (or raises the writer's error)."""

    def __init__(self, checkpoint_id: int):
        self.id = checkpoint_id
        self.enqueue_s = 0.0          # time the caller's thread spent in checkpoint_async
        self.lag_s: float | None = None   # from enqueue to durable
        self.lag_checkpoints: int | None = None   # checkpoints enqueued meanwhile
        self.stats = None
        self.phases: dict = {}        # seconds the enqueue spent per part (profiling)
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._enqueued_at = time.perf_counter()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None):
        if not self._done.wait(timeout):
            raise ConcordiaError(f"checkpoint {self.id} is not durable after {timeout} s")
        if self.error is not None:
            raise ConcordiaError(f"checkpoint {self.id} was not written: {self.error}") from self.error
        return self.stats

    def _finish(self, stats=None, error=None, newest: int = 0):
        self.stats, self.error = stats, error
        self.lag_s = time.perf_counter() - self._enqueued_at
        self.lag_checkpoints = max(0, newest - self.id)
        self._done.set()


@dataclass
class _RegionSlot:
    """One region's share of a ring slot: device list, count and staging; pinned host copies."""
    capacity: int              # pages
    pages: object              # DeviceBuffer i32[capacity]
    count: object              # DeviceBuffer i32[1]
    staging: object            # DeviceBuffer u32[capacity * words_per_page]
    host_pages: np.ndarray     # pinned i32[capacity]
    host_count: np.ndarray     # pinned i32[1]
    host_data: np.ndarray      # pinned u8[capacity * page_size]
    launches: dict = field(default_factory=dict)
    rows: np.ndarray | None = None   # host_data as capacity x page_size (row k: listed page k)
    short_last: bool = False         # the region's last page is short (its size is not pages)
    # a host scanner's list: the first of its regions in the slot owns it (fills it, copies it
    # to the device); the others share its four buffers (the guard's 56 KV tensors: one list)
    owns_list: bool = True


@dataclass
class _Slot:
    """One place in the bounded ring. On a stream it holds each region's staging (None for a
    region captured at once) and its graph; otherwise it is only a token of the bound."""
    regions: list              # _RegionSlot or None per region
    index: int = 0
    event: object = None       # recorded again by each capture that uses the slot
    graph: object = None       # the capture's device work as one graph
    arena: object = None       # the mapped memory its regions' staging is carved from


@dataclass
class _Capture:
    id: int
    handle: CheckpointHandle
    slot: _Slot | None = None       # the ring slot it holds until the writer has logged it
    event: object = None
    counts: list = field(default_factory=list)   # pages per region; None: count on the device
    pieces: list | None = None      # (region id, [(page, bytes)]) for captures made at once
    coalesced: list = field(default_factory=list)
    released: bool = False          # its slot is back in the ring
    ring_tasks: list = field(default_factory=list)   # its gathers on the persistent kernel


class CheckpointWriter:
    """The staging ring and the writer thread of one Checkpointer (see the module docstring)."""

    def __init__(self, ckpt, slots: int = 4, slot_bytes: int = 16 << 20, when_full: str = "wait",
                 compact_at_bytes: int | None = None, device_side: str = "stream"):
        check_ring(slots, when_full, device_side)
        self.ckpt, self.rt, self.when_full = ckpt, ckpt.rt, when_full
        self.compact_at = compact_at_bytes
        self.compactions: list[dict] = []   # seconds, bytes before and after, each time
        self.compacting = threading.Lock()  # held while the log is being swapped
        self.compaction: BackgroundCompaction | None = None   # one under way
        self.reapers: list[threading.Thread] = []   # old logs being removed
        self.backend = self.rt.backend
        # stream-ordered capture where the backend has streams and graphs (cuda); else at once
        self.streams = self.backend.streams and self.backend.graphs and any(
            self._streamable(st) for st in ckpt.states)
        self.free: queue.Queue = queue.Queue()   # the ring: captures in flight hold its slots
        self.slots, self.slot_bytes = slots, slot_bytes
        self.ring: list[_Slot] = []   # the slots made so far
        picked = [j for j, st in enumerate(ckpt.states) if _ring_gathered(st)]
        # region index -> its index in the RingGather (design (b) only; module docstring)
        self.ring_regions = {j: k for k, j in enumerate(picked)} if device_side == "ring" else {}
        # design (b)'s resident kernel is given every slot at its start; otherwise a slot is
        # made when all those made so far are in flight (_take): a writer that keeps up uses
        # two (the Hugging Face guard made four a generate call, ~13 ms each on an H100)
        made = [self._make_slot() for _ in range(
            slots if self.ring_regions or not self.streams else 1)]
        self.gather_ring = (RingGather(self.rt, [ckpt.states[j] for j in picked],
                                       [[slot.regions[j] for j in picked] for slot in made])
                            if self.ring_regions else None)   # checked by the Checkpointer
        # each bounded host scanner once, with its share's capacity (the same in every slot)
        self.bounded = list({id(st.scanner): (st.scanner, rs.capacity) for st, rs in
                             zip(ckpt.states, made[0].regions) if _host_bounded(st)}.values())
        self.now, self.host_lists = self._capture_plan(made[0])
        for slot in made:
            self._capture_graph(slot)
            self.free.put(slot)
        if self.gather_ring is not None:   # the graphs are ready: the resident kernel may start
            self.gather_ring.launch()
        self.max_coalesce = self._coalesce_bound(slot_bytes) if self.streams else MAX_COALESCE
        self.pending: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.durable_id = ckpt.checkpoint_id
        self.enqueued_id = ckpt.checkpoint_id
        self.processed_id = ckpt.checkpoint_id   # the newest the writer is done with (or failed)
        self.flushing = False                    # a flush is waiting: no holding back
        self.coalesced: list[CheckpointHandle] = []
        # the writer's seconds by part, summed (profiling: which part keeps it behind)
        self.busy = dict.fromkeys(("device", "pieces", "append", "commit", "sync"), 0.0)
        self.thread = threading.Thread(target=self._run, name="concordia-checkpoint-writer",
                                       daemon=True)
        self.thread.start()

    def _capture_plan(self, slot: _Slot) -> tuple[list, list]:
        """What a capture does a region, decided once: the regions captured at enqueue, and
        each host list as (its owner, the regions that share it). The guard's 56 KV tensors
        share one list, filled once; a loop over the regions a capture cost ~0.1 ms (H100)."""
        if not self.streams:
            return [], []
        now = [j for j, rs in enumerate(slot.regions) if rs is None]
        owners: dict = {}
        for j, (st, rs) in enumerate(zip(self.ckpt.states, slot.regions)):
            if rs is not None and _host_listed(st):
                owners.setdefault(id(rs.host_pages), []).append(j)
        return now, [(js[0], js) for js in owners.values()]

    def _make_slot(self) -> _Slot:
        """A ring slot's staging (without its graph: _capture_graph)."""
        slot = _Slot([], index=len(self.ring))
        if self.streams:
            slot.arena, slot.regions = self._region_slots(self.slot_bytes)
        self.ring.append(slot)
        return slot

    def _capture_graph(self, slot: _Slot) -> None:
        if self.streams:
            slot.graph = self.backend.capture(*self._branches(slot), first=self._lists_in(slot))

    def _coalesce_bound(self, slot_bytes: int) -> int:
        """Checkpoints coalesced in a row at most. Where every list is a device list (a block
        table's: a known number of entries a step) or a device scan (at most the region), as
        many as a slot's lists hold, less the step that ends them; where a host scanner lists
        pages (any number a step), MAX_COALESCE."""
        steps = []
        for st in self.ckpt.states:
            if _device_listed(st):
                steps.append(_list_capacity(st, slot_bytes) // _entries_a_step(st) - 1)
            elif st.scanner is not None and self._streamable(st):
                return MAX_COALESCE
        return max(MAX_COALESCE, min(steps)) if steps else MAX_COALESCE

    @staticmethod
    def _streamable(st) -> bool:
        return st.scanner is not None or (st.mode == "shadow" and st.native is None)

    def _region_slots(self, slot_bytes: int) -> tuple:
        """(the slot's mapped memory, each region's share of the slot, or None for a region
        captured at once). The regions' staging is carved from one mapped allocation (one a
        region cost the guard 232 driver allocations, ~0.1 ms each); regions of one host
        scanner share its list."""
        caps = [self._capacity(st, slot_bytes) if self._streamable(st) else 0
                for st in self.ckpt.states]
        # each share rounded to 256 bytes: the gathers' writes to host memory stay aligned
        words = [-(-cap * st.region.words_per_page // 64) * 64
                 for cap, st in zip(caps, self.ckpt.states)]
        arena = self.rt.mapped(max(1, sum(words)), np.uint32)
        lists: dict = {}   # (scanner, capacity) -> the _RegionSlot that owns its list
        shares, first = [], 0
        for st, cap, w in zip(self.ckpt.states, caps, words):
            staging = arena.part(first, cap * st.region.words_per_page)
            shares.append(self._region_slot(st, cap, staging, lists) if cap else None)
            first += w
        return arena, shares

    def _capacity(self, st, slot_bytes: int) -> int:
        """Pages a region's share of a slot holds."""
        r = st.region
        # a device scan may find every page: its slot holds the whole region
        cap = r.n_pages if st.scanner is None else max(1, min(r.n_pages, slot_bytes // r.page_size))
        if _host_bounded(st):   # a known number of pages a step: room for HOST_LIST_STEPS
            cap = min(cap, HOST_LIST_STEPS * st.scanner.pages_a_step)
        if _device_listed(st):   # a device list has one entry per written slot, repeats and all:
            # room for the slot budget, and for at least 4 steps' entries whatever it is
            cap = _list_capacity(st, slot_bytes)
        return cap

    def _region_slot(self, st, cap: int, staging, lists: dict) -> _RegionSlot:
        # the gathers write straight into host memory (zero-copy): the writer copies nothing.
        # (Gathering into device memory and copying out on the writer's stream was measured
        # slower on an H100: the writer's copy waited a decode step's length; docs/checkpointing.md)
        r, rt, b = st.region, self.rt, self.backend
        hosted = _host_listed(st)
        shared = lists.get((id(st.scanner), cap)) if hosted else None
        if shared is not None:
            rs = _RegionSlot(cap, shared.pages, shared.count, staging, shared.host_pages,
                             shared.host_count, staging.host.view(np.uint8), owns_list=False)
        else:
            rs = _RegionSlot(cap, rt.empty(cap, np.int32), rt.zeros(1, np.int32), staging,
                             b.pinned(cap * 4).view(np.int32), b.pinned(4).view(np.int32),
                             staging.host.view(np.uint8))
            rs.host_count[0] = 0
            if hosted:
                lists[id(st.scanner), cap] = rs
        rs.rows = rs.host_data[:cap * r.page_size].reshape(cap, r.page_size)
        rs.short_last = r.page_bytes(r.n_pages - 1) != r.page_size
        counted = hk.counted_page_gatherer(r.words_per_page, r.n_words)
        if st.scanner is not None:   # the list comes from the scanner: no shadow to update
            rs.launches["gather"] = rt.bind(counted, hk.GROUP, (r.words(), rs.staging, rs.pages,
                                                                rs.count, rs.staging, 0))
        if _device_listed(st):
            lister, groups, advance = st.scanner.kernels(cap)
            sc = st.scanner
            bound = rt.bind(lister, 64, (sc.table, sc.pos, sc.last, rs.pages))
            rs.launches["list"] = lambda stream, bound=bound, groups=groups: bound(groups, stream)
            rs.launches["advance"] = rt.bind(advance, 1, (sc.pos, sc.last, rs.count))
        elif st.scanner is None:
            rs.launches["scan"] = rt.bind(hk.page_scanner(r.words_per_page, r.n_words), hk.GROUP,
                                          (r.words(), st.shadow, rs.pages, rs.count))
            rs.launches["gather"] = rt.bind(counted, hk.GROUP, (r.words(), st.shadow, rs.pages,
                                                                rs.count, rs.staging, 1))
        return rs

    # -- the caller's side
    def overflows(self) -> bool:
        """A host scanner lists more pages than its share of a slot holds (after a long
        pause between checkpoints): the Checkpointer takes this one at once instead."""
        return any(len(scanner.dirty_pages()) > cap for scanner, cap in self.bounded)

    def enqueue(self, stream) -> CheckpointHandle:
        t0 = time.perf_counter()
        self.raise_error()
        slot = self._take()
        if slot is None:   # ring full, coalescing
            h = CheckpointHandle(self.enqueued_id + 1)
            self.coalesced.append(h)
            h.enqueue_s = time.perf_counter() - t0
            return h
        t_slot = time.perf_counter()
        self.ckpt.checkpoint_id += 1
        cap = _Capture(self.ckpt.checkpoint_id, CheckpointHandle(self.ckpt.checkpoint_id), slot)
        cap.handle.phases["slot"] = t_slot - t0
        cap.coalesced, self.coalesced = self.coalesced, []
        try:
            if self.streams:
                self._capture_with_graph(cap, stream)
            else:
                cap.pieces = [(st.region.id, _capture_region_now(st)) for st in self.ckpt.states]
        except BaseException:
            self.ckpt.checkpoint_id -= 1
            self.free.put(slot)
            raise
        self.enqueued_id = cap.id
        self.pending.put(cap)
        cap.handle.enqueue_s = time.perf_counter() - t0
        return cap.handle

    def _take(self):
        """A free slot (a new one while fewer than `slots` are made): else wait for one
        (checking the writer's health), or None to coalesce."""
        while True:
            try:
                return self.free.get_nowait()
            except queue.Empty:
                pass
            if len(self.ring) < self.slots:   # every slot made so far is in flight
                slot = self._make_slot()
                self._capture_graph(slot)
                return slot
            if self.when_full == "coalesce" and len(self.coalesced) < self.max_coalesce:
                return None
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                self.raise_error()

    def synced(self, checkpoint_id: int):
        """A synchronous checkpoint (Checkpointer.checkpoint) was committed: it is the newest."""
        self.durable_id = self.enqueued_id = self.processed_id = checkpoint_id

    def _branches(self, slot: _Slot) -> list:
        """The slot's device work, as its graph holds it: a branch per region, or per group of
        regions past MAX_BRANCHES (regions are independent, so their chains run side by
        side). Page lists and counts come from the slot's pinned memory (read at each replay)
        or from the device; the gathers stride over the list (hk.GATHER_GROUPS groups at
        most)."""
        chains = [j for j, rs in enumerate(slot.regions) if rs is not None]

        def branch(js):
            def record(stream):
                for j in js:
                    self._record_region(j, slot.regions[j], stream)
            return record
        return [branch(chains[k::MAX_BRANCHES]) for k in range(min(len(chains), MAX_BRANCHES))]

    def _lists_in(self, slot: _Slot):
        """The graph's first nodes: each host scanner's list and count, from the slot's pinned
        memory to the device, once for all the regions that share it."""
        owners = [rs for st, rs in zip(self.ckpt.states, slot.regions)
                  if rs is not None and _host_listed(st) and rs.owns_list]

        def record(stream):
            for rs in owners:
                self.backend.copy_in_on(stream, rs.count.handle, rs.host_count)
                self.backend.copy_in_on(stream, rs.pages.handle, rs.host_pages)
        return record if owners else None

    def _record_region(self, j: int, rs: _RegionSlot, stream):
        st, b, groups = self.ckpt.states[j], self.backend, min(rs.capacity, hk.GATHER_GROUPS)
        ring = j in self.ring_regions
        if _device_listed(st):   # the block table names the pages; the device keeps `last`
            rs.launches["list"](stream)
            rs.launches["advance"](1, stream)
            if not ring:
                rs.launches["gather"](groups, stream)
            b.copy_out_on(stream, rs.count.handle, rs.host_count)
            b.copy_out_on(stream, rs.pages.handle, rs.host_pages)
            if ring:   # the persistent kernel gathers once the stream gets here
                self.gather_ring.record_trigger(self.ring_regions[j], stream)
        elif st.scanner is not None:   # its list came in before the branches (_lists_in)
            rs.launches["gather"](groups, stream)
        else:
            b.memset32_on(stream, rs.count.handle, 0, 1)
            rs.launches["scan"](st.region.n_pages, stream)
            rs.launches["gather"](groups, stream)
            b.copy_out_on(stream, rs.count.handle, rs.host_count)   # what the scan found
            b.copy_out_on(stream, rs.pages.handle, rs.host_pages)

    def _capture_with_graph(self, cap: _Capture, stream):
        """Fill the slot's pinned page lists, replay its graph, record its event: the whole
        device side of a checkpoint in two driver calls."""
        slot, states = cap.slot, self.ckpt.states
        t0 = time.perf_counter()
        counts = [None] * len(states)   # None: counted on the device
        for j in self.now:   # hash / tracked: captured now, on the legacy stream
            counts[j] = _capture_region_now(states[j])
        for owner, users in self.host_lists:   # each host list once for all its regions
            scanner, rs = states[owner].scanner, slot.regions[owner]
            pages = scanner.dirty_pages()
            n = len(pages)
            _check_capacity(states[owner].region, n, rs.capacity)
            rs.host_pages[:n] = pages
            rs.host_count[0] = n
            for j in users:
                counts[j] = n
                scanner.committed()
        cap.counts = counts
        t1 = time.perf_counter()
        self.backend.launch_graph(slot.graph, stream)
        t2 = time.perf_counter()
        cap.event = slot.event = self.backend.record_event(stream, slot.event)
        t3 = time.perf_counter()
        if self.gather_ring is not None:   # after the replay: its trigger is on its way
            cap.ring_tasks = [self.gather_ring.publish(slot.index, k)
                              for k in self.ring_regions.values()]
        cap.handle.phases.update(lists=t1 - t0, graph=t2 - t1, event=t3 - t2,
                                 ring=time.perf_counter() - t3)

    def flush(self, timeout: float | None = None) -> int:
        """Wait until every checkpoint enqueued so far is durable; returns durable_id."""
        target, end = self.enqueued_id, None if timeout is None else time.monotonic() + timeout
        with self.pending.not_empty:   # a writer holding a capture back starts on it now
            self.flushing = True
            self.pending.not_empty.notify_all()
        while self.processed_id < target:
            if end is not None and time.monotonic() > end:
                raise ConcordiaError(f"checkpoints up to {target} are not durable after {timeout} s")
            time.sleep(0.0002)
        with self.compacting:   # a compaction under way ends first: the log is whole again
            pass
        self.flushing = False
        self.raise_error()
        return self.durable_id

    def raise_error(self):
        if self.error is not None:
            err, self.error = self.error, None
            self.ckpt.need_full = True
            raise ConcordiaError(f"the checkpoint writer failed: {err}") from err

    def close(self):
        try:
            self.flush()
        finally:
            self.pending.put(None)
            self.thread.join()
            if self.compaction is not None:   # one under way ends whole, or not at all
                try:
                    self._end_compaction()
                except Exception as e:   # the old log is whole and stays in use
                    self.compactions.append({"error": str(e)})
            for reaper in self.reapers:   # the old logs' space is given back before close returns
                reaper.join()
            if self.gather_ring is not None:
                self.gather_ring.close()
            self._release_ring()

    def _release_ring(self):
        """Give back every slot's graph, event, lists and staging, once the device is past
        them (each guard of a generate call kept its ring's pinned memory before)."""
        b, rt = self.backend, self.rt
        ring, self.ring = self.ring, []
        for slot in ring:
            if slot.event is not None:
                b.wait_event(slot.event)
                b.destroy_event(slot.event)
            if slot.graph is not None:
                b.destroy_graph(slot.graph)
            for rs in slot.regions:
                if rs is not None and rs.owns_list:
                    rt.free(rs.pages)
                    rt.free(rs.count)
                    b.free_pinned(rs.host_pages)
                    b.free_pinned(rs.host_count)
            if slot.arena is not None:
                rt.free_mapped(slot.arena)

    # -- the writer's side
    def _run(self):
        while True:
            cap = self.pending.get()
            if cap is None:
                return
            group = [cap]
            try:
                if self.streams:
                    self._hold(cap)
                self._write(cap)
                # group commit: the captures queued behind it share one fsync (only those: a
                # caller that keeps enqueueing must not postpone durability without bound;
                # on a stream, only those the device has finished)
                for nxt in self._queued(self.pending.qsize(), ready=self.streams):
                    group.append(nxt)
                    self._write(nxt)
                t = time.perf_counter()
                self.ckpt.log.sync()
                self.busy["sync"] += time.perf_counter() - t
            except BaseException as e:   # surfaced by the caller's next call
                self._fail(group, e)
                continue
            self.durable_id = self.processed_id = group[-1].id
            for c in group:
                for h in [c.handle, *c.coalesced]:
                    h._finish(c.handle.stats, newest=self.enqueued_id)
            try:
                self._maybe_compact()
            except BaseException as e:   # the log is still the old one: surfaced, not fatal
                self.error = e

    def _maybe_compact(self):
        """Bounded log: past compact_at_bytes, a BackgroundCompaction folds it into one base
        image while this writer goes on appending; after a later group, once it is done, the
        writer swaps the logs (the only pause of its appends: the last records and a rename)."""
        if self.compaction is not None:
            if self.compaction.done.is_set():
                self._end_compaction()
        elif self.compact_at and self.ckpt.log.synced[0] > self.compact_at:
            self.compaction = BackgroundCompaction(self.ckpt.log)

    def _end_compaction(self):
        """Swap in the compacted log (on an error the old log stays in use, and it raises)."""
        job, self.compaction = self.compaction, None
        with self.compacting:
            self.ckpt.log = job.finish()
        self.compactions.append(job.stats())
        self.reapers = [t for t in self.reapers if t.is_alive()] + [job.reaper] * bool(job.reaper)

    def _hold(self, cap: _Capture):
        """Start on a capture once the caller has enqueued the next one (or HOLD_S passed, or
        a flush asks): the caller is then waiting for its device, with the GIL released, so
        the writer's Python does not compete with the caller's next step for it. It waits
        asleep on the queue's condition, which put() and flush() notify, rather than waking
        every 50 us for the GIL (see Backend.wait_event)."""
        left = cap.handle._enqueued_at + HOLD_S - time.perf_counter()
        arrived = self.pending.not_empty   # the Condition of Queue.put, on the queue's mutex
        with arrived:
            arrived.wait_for(lambda: self.pending.queue or self.flushing, max(0.0, left))

    def _queued(self, limit: int | None = None, ready: bool = False):
        """The captures queued now (at most `limit`; with `ready`, only while the device has
        finished them), leaving the stop marker in place."""
        n = 0
        while limit is None or n < limit:
            if ready:
                with self.pending.mutex:
                    head = self.pending.queue[0] if self.pending.queue else None
                if head is None or head.event is None or not self.backend.event_done(head.event):
                    return
            try:
                c = self.pending.get_nowait()
            except queue.Empty:
                return
            if c is None:
                self.pending.put(None)
                return
            n += 1
            yield c

    def _fail(self, group, error):
        self.error = error
        leftover = list(self._queued())
        for c in group + leftover:
            if not c.released:
                self.free.put(c.slot)
            for h in [c.handle, *c.coalesced]:
                if not h.done():
                    h._finish(error=error, newest=self.enqueued_id)
        self.processed_id = max(c.id for c in group + leftover)

    def _write(self, cap: _Capture):
        t_write = time.perf_counter()
        if cap.pieces is None:
            self.backend.wait_event(cap.event)   # asleep, not polling: see wait_event
            for tasks in cap.ring_tasks:
                self.gather_ring.wait(tasks)
        t_device = time.perf_counter()
        pieces = cap.pieces if cap.pieces is not None else self._pieces(cap)
        t_pieces = time.perf_counter()
        pages, nbytes = self._append(pieces)
        t_append = time.perf_counter()
        info = {"checkpoint": cap.id, "pages": pages, "bytes": nbytes, "full": False,
                "time": time.time(), "backend": str(self.rt.spec), "async": True}
        self.ckpt.log.commit(cap.id, info, sync=False)
        busy, now = self.busy, time.perf_counter()
        busy["device"] += t_device - t_write
        busy["pieces"] += t_pieces - t_device
        busy["append"] += t_append - t_pieces
        busy["commit"] += now - t_append
        cap.handle.phases["write"] = time.perf_counter() - t_write
        self.free.put(cap.slot)
        cap.released = True
        cap.handle.stats = CheckpointStats(cap.id, pages, nbytes,
                                           time.perf_counter() - cap.handle._enqueued_at, False)

    def _append(self, pieces: list) -> tuple[int, int]:
        """A capture's pieces into the log: pages and bytes appended. The regions' arrays go
        in together (DeltaLog.append_scatters), YIELD_BYTES at a time, with little Python a
        region (the Hugging Face guard's 58 regions a token: its appends 0.96 -> 0.52 ms)."""
        log, page_size = self.ckpt.log, self.ckpt.page_size
        pages = nbytes = size = 0
        gil, arrays = _Yielder(), []
        for region_id, items in pieces:
            if isinstance(items, _Rows):
                arrays.append((region_id, items.pages, items.rows))
                size += items.rows.nbytes
                if items.tail:   # a short last page
                    pages += log.append_pages(region_id, page_size, items.tail)
                    size += len(items.tail[0][1])
                if size >= YIELD_BYTES:
                    pages += log.append_scatters(page_size, arrays)
                    gil.wrote(len(arrays), size)
                    nbytes, arrays, size = nbytes + size, [], 0
                continue
            for first in range(0, len(items), YIELD_EVERY):
                part = items[first:first + YIELD_EVERY]
                pages += log.append_pages(region_id, page_size, part)
                part_bytes = sum(len(d) for _, d in part)
                nbytes += part_bytes
                gil.wrote(len(part), part_bytes)
        return pages + log.append_scatters(page_size, arrays), nbytes + size

    def _pieces(self, cap: _Capture) -> list:
        """A graph capture, its event passed: counts, lists and pages are in host memory. Each
        region's pages as _Rows (arrays, for append_scatter: no Python per page)."""
        out, lists = [], {}   # a host list several regions share: read once
        for st, rs, n in zip(self.ckpt.states, cap.slot.regions, cap.counts):
            r = st.region
            if isinstance(n, list):   # captured at enqueue
                out.append((r.id, n))
                continue
            if _device_listed(st):   # a device list may name a page twice (two slots of it)
                n = int(rs.host_count[0])
                _check_capacity(r, n, rs.capacity)
                listed, slots = np.unique(rs.host_pages[:n], return_index=True)
                out.append((r.id, _Rows.of(r, rs, listed.astype("<u8"), rs.rows[slots])))
                continue
            if (listed := lists.get(id(rs.host_pages))) is None:
                n = int(rs.host_count[0]) if n is None else n
                _check_capacity(r, n, rs.capacity)
                listed = lists[id(rs.host_pages)] = rs.host_pages[:n].astype("<u8")
            # staged in list order, each page once: the rows are the staging's, no copy
            out.append((r.id, _Rows.of(r, rs, listed, rs.rows[:len(listed)])))
        return out


class _Yielder:
    """Lets the caller's thread have the GIL after every YIELD_EVERY records or YIELD_BYTES
    bytes the writer appended (see YIELD_EVERY)."""

    def __init__(self):
        self.records = self.bytes = 0

    def wrote(self, records: int, nbytes: int) -> None:
        self.records += records
        self.bytes += nbytes
        if self.records >= YIELD_EVERY or self.bytes >= YIELD_BYTES:
            self.records = self.bytes = 0
            time.sleep(0)


@dataclass
class _Rows:
    """A region's captured pages as arrays: their indices and bytes, row k holding page
    pages[k]; a short last page (a region's size need not be whole pages) apart, as a piece."""
    pages: np.ndarray
    rows: np.ndarray
    tail: list

    @classmethod
    def of(cls, region, rs: _RegionSlot, pages: np.ndarray, rows: np.ndarray) -> "_Rows":
        last = region.n_pages - 1
        if not rs.short_last or not (hit := np.flatnonzero(pages == last)).size:
            return cls(pages, rows, [])
        keep = pages != last
        return cls(pages[keep], rows[keep], [(last, bytes(rows[hit[0], :region.page_bytes(last)]))])

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + sum(len(d) for _, d in self.tail)


def _ring_gathered(st) -> bool:
    """A region design (b) may gather beside the stream (ring_gather's docstring)."""
    return _device_listed(st) and getattr(st.scanner, "append_only", False)


def _device_listed(st) -> bool:
    """A region whose scanner lists its pages on the device (BlockTableScanner)."""
    return getattr(st.scanner, "device_lister", False)


def _host_listed(st) -> bool:
    """A region whose pages a host scanner lists (the list goes to the device by copy)."""
    return st.scanner is not None and not _device_listed(st)


def _host_bounded(st) -> bool:
    """A host-listed region whose scanner says how many pages a step touches at most."""
    return _host_listed(st) and getattr(st.scanner, "pages_a_step", None) is not None


def _entries_a_step(st) -> int:
    """A device list's entries for one decode step (a slot per plane and sequence)."""
    return st.scanner.planes * st.scanner.batch


def _list_capacity(st, slot_bytes: int) -> int:
    """A device list's room in a slot: the slot budget, and at least 4 steps' entries."""
    return max(slot_bytes // st.region.page_size, 4 * _entries_a_step(st))


def _capture_region_now(st) -> list:
    """A region's (page, bytes) pieces, found and copied in the caller's thread."""
    pages = st.find_dirty()
    pieces = list(st.gather(pages))
    st.after_commit(pages)
    return pieces


def _check_capacity(region, n: int, capacity: int):
    if n > capacity:
        raise ConcordiaError(f"region {region.name!r}: {n} dirty pages, more than a staging slot "
                             f"holds ({capacity}); raise slot_bytes or checkpoint more often")

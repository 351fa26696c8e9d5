"""The staging ring of asynchronous checkpoints: bounded slots of page lists and host-mapped
staging, each with the graph that fills it in the caller's stream (async_checkpoint.py says
what runs where).

A slot holds, per region, a page list (the host scanner's, or the device's own: a scan or a
block table's list), its count and the staging the gathers write into, in host-mapped memory
carved from one allocation. Its graph, captured once, copies the host lists in, runs the
device scans and listers, and gathers every listed page; a replay of it is a checkpoint's
whole device side. Without streams and graphs a slot is only a token of the bound.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from concordia_ir.errors import ConcordiaError

from . import kernels as hk
from .ring_gather import RingGather

# checkpoints coalesced in a row at most where a host scanner lists pages; the next one waits
# for a slot. A coalesced step's pages wait for the next capture, and a staging slot holds a
# bounded number of steps' worth: unbounded coalescing overflowed it at batch 8. Where every
# list is the device's, the bound is what a slot holds (CheckpointWriter._coalesce_bound)
MAX_COALESCE = 3
# branches of a capture's graph at most: regions are independent, so their chains run side by
# side (a branch each was 2-3x faster at batch 1 with three regions), but each branch costs the
# graph's launch a fork and a join, on the caller's thread (the guard's 58 regions: 428 us)
MAX_BRANCHES = 8
# Steps of pages a slot holds for a host scanner that says how many pages a step touches
# (pages_a_step): sized to the region instead, the Hugging Face guard's ring pinned 130 MB
# for 256 tokens and its second call took 0.14 s. A list longer than that is checkpointed
# at once (CheckpointWriter.overflows), never lost.
HOST_LIST_STEPS = 4 * (MAX_COALESCE + 1)
# device_side="fork": a region scanned against its shadow is copied whole, in the caller's
# stream, into the slot's device memory, and scanned and gathered from that copy on the side
# stream; up to this size (a larger one stays in the stream: the copy would cost more than the
# scan's chain of five dependent nodes, ~30 us on an H100, that it takes off the stream)
SNAPSHOT_BYTES = 64 << 20
# Groups of a forked gather (device_side="fork"), which runs beside the next decode step: its
# writes into host memory are bound by the bus, not by SMs, and each SM its groups hold is one
# the step's kernels wait for. On an H100 at batch 8 a step beside a gather of up to 1,024
# groups took 42 us longer than a plain one, beside one of 16 groups 23 us (the in-stream
# gather keeps GATHER_GROUPS: there, fewer groups took 4 us longer)
SIDE_GATHER_GROUPS = 16
# Rings whose slots a runtime keeps after their Checkpointer closed, for the next ring over
# the same memory: a Hugging Face guard a generate call made two slots (58 kernel bindings
# and a graph each, 7-8 ms on an H100) though the next call's StaticCache gets the freed
# tensors back at the same addresses from torch's allocator. Only slots whose graphs read
# nothing but the regions and their own memory (host-listed regions) are kept.
IDLE_RINGS = 2


@dataclass
class RegionSlot:
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
    snapshot: object = None          # DeviceBuffer u32: the region as of the capture (fork)


@dataclass
class Slot:
    """One place in the bounded ring. On a stream it holds each region's staging (None for a
    region captured at once) and its graph; otherwise it is only a token of the bound."""
    regions: list              # RegionSlot or None per region
    index: int = 0
    event: object = None       # recorded again by each capture that uses the slot
    graph: object = None       # the capture's device work as one graph
    side: object = None        # device_side="fork": the gathers forked off the caller's stream
    fork: object = None        # ... and the event on the caller's stream they wait for
    arena: object = None       # the mapped memory its regions' staging is carved from


@dataclass
class Replay:
    """What a slot's replay left for the writer: pages per region (None: counted on the
    device; a list: captured at enqueue), the event to wait for, the persistent kernel's
    gathers (design (b)), and the enqueue's seconds by part."""
    counts: list
    event: object = None
    ring_tasks: list = field(default_factory=list)
    phases: dict = field(default_factory=dict)


class StagingRing:
    """The slots of one CheckpointWriter: made as needed, up to `slots` (design (b)'s resident
    kernel is given every slot at its start), replayed by the caller's thread, read by the
    writer's, given back by release()."""

    def __init__(self, rt, states: list, slots: int, slot_bytes: int, device_side: str):
        self.rt, self.backend, self.states = rt, rt.backend, states
        self.slots, self.slot_bytes = slots, slot_bytes
        # stream-ordered capture where the backend has streams and graphs (cuda); else at once
        self.streams = self.backend.streams and self.backend.graphs and any(
            streamable(st) for st in states)
        self.made: list[Slot] = []
        picked = [j for j, st in enumerate(states) if ring_gathered(st)]
        # region index -> its index in the RingGather (design (b) only; async_checkpoint.py)
        self.ring_regions = {j: k for k, j in enumerate(picked)} if device_side == "ring" else {}
        # the regions whose gathers run on the backend's side stream (device_side="fork"), and
        # of them those scanned there from a copy made in the caller's stream
        fork = device_side == "fork" and self.streams
        self.snapshots = {j for j, st in enumerate(states) if snapshot_scanned(st)} if fork else set()
        self.forked = set(picked) | self.snapshots if fork else set()
        self.key = self._reuse_key()   # what a kept slot must match to serve this ring
        self.reused = 0                # slots taken from the ones earlier rings left
        # otherwise a slot is made when all those made so far are in flight (take_new): a
        # writer that keeps up uses two (the Hugging Face guard made four a generate call,
        # ~13 ms each on an H100). A ring with a block table's device list (a decode loop's)
        # makes them all now: made mid-run, when a writer fell behind, a slot's allocation and
        # capture held the decode thread 20-60 ms on an H100 (a run 8-18 % slower)
        eager = self.ring_regions or not self.streams or any(device_listed(st) for st in states)
        first = [self._make() for _ in range(slots if eager else 1)]
        self.gather_ring = (RingGather(rt, [states[j] for j in picked],
                                       [[slot.regions[j] for j in picked] for slot in first])
                            if self.ring_regions else None)   # checked by the Checkpointer
        # each bounded host scanner once, with its share's capacity (the same in every slot)
        self.bounded = list({id(st.scanner): (st.scanner, rs.capacity) for st, rs in
                             zip(states, first[0].regions) if host_bounded(st)}.values())
        self.now, self.host_lists = self._plan(first[0])
        for slot in first:
            self._capture_graph(slot)
        if self.gather_ring is not None:   # the graphs are ready: the resident kernel may start
            self.gather_ring.launch()

    def take_new(self) -> Slot | None:
        """A new slot while fewer than `slots` are made (every one made is in flight)."""
        if len(self.made) >= self.slots:
            return None
        slot = self._make()
        self._capture_graph(slot)
        return slot

    # -- the caller's side
    def replay(self, slot: Slot, stream) -> Replay:
        """Fill the slot's pinned page lists, replay its graph, record its event: the whole
        device side of a checkpoint in two driver calls."""
        states, t0 = self.states, time.perf_counter()
        out = Replay([None] * len(states))
        for j in self.now:   # hash / tracked: captured now, on the legacy stream
            out.counts[j] = capture_region_now(states[j])
        for owner, users in self.host_lists:   # each host list once for all its regions
            scanner, rs = states[owner].scanner, slot.regions[owner]
            pages = scanner.dirty_pages()
            n = len(pages)
            check_capacity(states[owner].region, n, rs.capacity)
            rs.host_pages[:n] = pages
            rs.host_count[0] = n
            for j in users:
                out.counts[j] = n
                scanner.committed()
        t1, b = time.perf_counter(), self.backend
        b.launch_graph(slot.graph, stream)
        t2 = time.perf_counter()
        if slot.side is not None:   # the forked gathers, once the caller's stream gets here
            slot.fork = b.record_event(stream, slot.fork)
            side = b.side_stream()
            b.stream_wait(side, slot.fork)
            b.launch_graph(slot.side, side)
            stream = side
        out.event = slot.event = b.record_event(stream, slot.event)
        t3 = time.perf_counter()
        if self.gather_ring is not None:   # after the replay: its trigger is on its way
            out.ring_tasks = [self.gather_ring.publish(slot.index, k)
                              for k in self.ring_regions.values()]
        out.phases = dict(lists=t1 - t0, graph=t2 - t1, event=t3 - t2, ring=time.perf_counter() - t3)
        return out

    # -- the writer's side
    def pieces(self, slot: Slot, counts: list) -> list:
        """A replay's pages, its event passed: counts, lists and pages are in host memory.
        Each region's pages as Rows (arrays, for append_scatter: no Python per page)."""
        out, lists = [], {}   # a host list several regions share: read once
        for st, rs, n in zip(self.states, slot.regions, counts):
            r = st.region
            if isinstance(n, list):   # captured at enqueue
                out.append((r.id, n))
                continue
            if device_listed(st):   # a device list may name a page twice (two slots of it)
                n = int(rs.host_count[0])
                check_capacity(r, n, rs.capacity)
                listed, slots = np.unique(rs.host_pages[:n], return_index=True)
                out.append((r.id, Rows.of(r, rs, listed.astype("<u8"), rs.rows[slots])))
                continue
            if (listed := lists.get(id(rs.host_pages))) is None:
                n = int(rs.host_count[0]) if n is None else n
                check_capacity(r, n, rs.capacity)
                listed = lists[id(rs.host_pages)] = rs.host_pages[:n].astype("<u8")
            # staged in list order, each page once: the rows are the staging's, no copy
            out.append((r.id, Rows.of(r, rs, listed, rs.rows[:len(listed)])))
        return out

    def release(self) -> None:
        """Give back every slot's graph, event, lists and staging once the device is past
        them (each guard of a generate call kept its ring's pinned memory before), or keep
        them for the next ring over the same memory (IDLE_RINGS)."""
        if self.gather_ring is not None:
            self.gather_ring.close()
        made, self.made = self.made, []
        for slot in made:
            if slot.event is not None:
                self.backend.wait_event(slot.event)
        if self.key is not None:
            made = _IDLE.park(self.rt, self.key, made, self.slots)
        for slot in made:
            destroy_slot(self.rt, slot)

    # -- making a slot
    def _make(self) -> Slot:
        """A ring slot's staging (without its graph: _capture_graph), or a kept one."""
        slot = _IDLE.take(self.rt, self.key) if self.key is not None else None
        self.reused += slot is not None
        if slot is None:
            slot = Slot([])
            if self.streams:
                slot.arena, slot.regions = self._region_slots()
        slot.index = len(self.made)
        self.made.append(slot)
        return slot

    def _reuse_key(self):
        """What a slot's staging and graph depend on, where that is only the regions' memory
        and the slot's own (every region in the stream host-listed); else None: not kept."""
        if not self.streams or self.ring_regions:
            return None
        parts, owners = [], {}
        for j, st in enumerate(self.states):
            if not streamable(st):
                parts.append(None)
                continue
            at = self.backend.address(st.region.buffer.handle)
            if not host_listed(st) or at is None:
                return None
            cap = self._capacity(st)
            r = st.region
            parts.append((at, r.nbytes, r.page_size, cap, owners.setdefault((id(st.scanner), cap), j)))
        return self.slot_bytes, tuple(parts)

    def _plan(self, slot: Slot) -> tuple[list, list]:
        """What a replay does a region, decided once: the regions captured at enqueue, and
        each host list as (its owner, the regions that share it). The guard's 56 KV tensors
        share one list, filled once; a loop over the regions a capture cost ~0.1 ms (H100)."""
        if not self.streams:
            return [], []
        now = [j for j, rs in enumerate(slot.regions) if rs is None]
        owners: dict = {}
        for j, (st, rs) in enumerate(zip(self.states, slot.regions)):
            if rs is not None and host_listed(st):
                owners.setdefault(id(rs.host_pages), []).append(j)
        return now, [(js[0], js) for js in owners.values()]

    def _region_slots(self) -> tuple:
        """(the slot's mapped memory, each region's share of the slot, or None for a region
        captured at once). The regions' staging is carved from one mapped allocation (one a
        region cost the guard 232 driver allocations, ~0.1 ms each); regions of one host
        scanner share its list."""
        caps = [self._capacity(st) if streamable(st) else 0 for st in self.states]
        # each share rounded to 256 bytes: the gathers' writes to host memory stay aligned
        words = [-(-cap * st.region.words_per_page // 64) * 64 for cap, st in zip(caps, self.states)]
        arena = self.rt.mapped(max(1, sum(words)), np.uint32)
        lists: dict = {}   # (scanner, capacity) -> the RegionSlot that owns its list
        shares, first = [], 0
        for j, (st, cap, w) in enumerate(zip(self.states, caps, words)):
            staging = arena.part(first, cap * st.region.words_per_page)
            shares.append(self._region_slot(j, cap, staging, lists) if cap else None)
            first += w
        return arena, shares

    def _capacity(self, st) -> int:
        """Pages a region's share of a slot holds."""
        r = st.region
        # a device scan may find every page: its slot holds the whole region
        cap = r.n_pages if st.scanner is None else max(1, min(r.n_pages, self.slot_bytes // r.page_size))
        if host_bounded(st):   # a known number of pages a step: room for HOST_LIST_STEPS
            cap = min(cap, HOST_LIST_STEPS * st.scanner.pages_a_step)
        if device_listed(st):   # a device list has one entry per written slot, repeats and all:
            # room for the slot budget, and for at least 4 steps' entries whatever it is
            cap = list_capacity(st, self.slot_bytes)
        return cap

    def _region_slot(self, j: int, cap: int, staging, lists: dict) -> RegionSlot:
        # the gathers write straight into host memory (zero-copy): the writer copies nothing.
        # (Gathering into device memory and copying out on the writer's stream was measured
        # slower on an H100: the writer's copy waited a decode step's length; docs/checkpointing.md)
        st = self.states[j]
        r, rt, b = st.region, self.rt, self.backend
        hosted = host_listed(st)
        shared = lists.get((id(st.scanner), cap)) if hosted else None
        if shared is not None:
            rs = RegionSlot(cap, shared.pages, shared.count, staging, shared.host_pages,
                            shared.host_count, staging.host.view(np.uint8), owns_list=False)
        else:
            rs = RegionSlot(cap, rt.empty(cap, np.int32), rt.zeros(1, np.int32), staging,
                            b.pinned(cap * 4).view(np.int32), b.pinned(4).view(np.int32),
                            staging.host.view(np.uint8))
            rs.host_count[0] = 0
            if hosted:
                lists[id(st.scanner), cap] = rs
        rs.rows = rs.host_data[:cap * r.page_size].reshape(cap, r.page_size)
        source = r.words()   # what the scan and gather read: the region, or its copy (fork)
        if j in self.snapshots:
            source = rs.snapshot = rt.empty(r.n_words, np.uint32)
        rs.short_last = r.page_bytes(r.n_pages - 1) != r.page_size
        counted = hk.counted_page_gatherer(r.words_per_page, r.n_words)
        if st.scanner is not None:   # the list comes from the scanner: no shadow to update
            rs.launches["gather"] = rt.bind(counted, hk.GROUP, (r.words(), rs.staging, rs.pages,
                                                                rs.count, rs.staging, 0))
        if device_listed(st):
            lister, groups, advance = st.scanner.kernels(cap)
            sc = st.scanner
            bound = rt.bind(lister, 64, (sc.table, sc.pos, sc.last, rs.pages))
            rs.launches["list"] = lambda stream, bound=bound, groups=groups: bound(groups, stream)
            rs.launches["advance"] = rt.bind(advance, 1, (sc.pos, sc.last, rs.count))
        elif st.scanner is None:
            rs.launches["scan"] = rt.bind(hk.page_scanner(r.words_per_page, r.n_words), hk.GROUP,
                                          (source, st.shadow, rs.pages, rs.count))
            rs.launches["gather"] = rt.bind(counted, hk.GROUP, (source, st.shadow, rs.pages,
                                                                rs.count, rs.staging, 1))
        return rs

    # -- its graph
    def _capture_graph(self, slot: Slot) -> None:
        if self.streams and slot.graph is None:   # a kept slot has its graph
            slot.graph = self.backend.capture(*self._branches(slot), first=self._lists_in(slot))
            if self.forked:
                forked = sorted(self.forked)
                slot.side = self.backend.capture(*[self._side_branch(slot, forked[k::MAX_BRANCHES])
                                                   for k in range(min(len(forked), MAX_BRANCHES))])

    def _side_branch(self, slot: Slot, js: list):
        """A branch of the forked graph: the rest of regions `js`'s captures (_record_rest).
        The side stream runs the captures in order, so each scan finds the shadow as the
        capture before it left it."""
        def record(stream):
            for j in js:
                self._record_rest(j, slot.regions[j], stream)
        return record

    def _branches(self, slot: Slot) -> list:
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

    def _lists_in(self, slot: Slot):
        """The graph's first nodes: each host scanner's list and count, from the slot's pinned
        memory to the device, once for all the regions that share it."""
        owners = [rs for st, rs in zip(self.states, slot.regions)
                  if rs is not None and host_listed(st) and rs.owns_list]

        def record(stream):
            for rs in owners:
                self.backend.copy_in_on(stream, rs.count.handle, rs.host_count)
                self.backend.copy_in_on(stream, rs.pages.handle, rs.host_pages)
        return record if owners else None

    def _record_region(self, j: int, rs: RegionSlot, stream):
        """A region's capture in the caller's stream: what must run at the capture point,
        then the rest, unless the rest is forked onto the side stream (_side_branch)."""
        st, b = self.states[j], self.backend
        if j in self.snapshots:   # the region as of this point; scanned on the side stream
            b.copy_device_on(stream, rs.snapshot.handle, st.region.words().handle, st.region.n_words * 4)
        elif device_listed(st):   # the block table names the pages; the device keeps `last`
            rs.launches["list"](stream)
            rs.launches["advance"](1, stream)
        if j not in self.forked:
            self._record_rest(j, rs, stream)

    def _record_rest(self, j: int, rs: RegionSlot, stream):
        """A region's capture after its capture point: the scan (of the region, or of its
        copy), the gather, and the list and count out to pinned memory."""
        st, b = self.states[j], self.backend
        groups = min(rs.capacity, SIDE_GATHER_GROUPS if j in self.forked else hk.GATHER_GROUPS)
        ring = j in self.ring_regions
        if device_listed(st):
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


def destroy_slot(rt, slot: Slot) -> None:
    """Give back a slot's event, graph, lists and staging (the device past them)."""
    b = rt.backend
    if slot.event is not None:
        b.destroy_event(slot.event)
    for graph in (slot.graph, slot.side):
        if graph is not None:
            b.destroy_graph(graph)
    if slot.fork is not None:
        b.destroy_event(slot.fork)
    for rs in slot.regions:
        if rs is not None and rs.snapshot is not None:
            rt.free(rs.snapshot)
        if rs is not None and rs.owns_list:
            rt.free(rs.pages)
            rt.free(rs.count)
            b.free_pinned(rs.host_pages)
            b.free_pinned(rs.host_count)
    if slot.arena is not None:
        rt.free_mapped(slot.arena)


class _IdleSlots:
    """The slots closed rings left, by runtime and by what they depend on (StagingRing.key),
    IDLE_RINGS keys a runtime at most, the least recently parked given back first."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_runtime: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def take(self, rt, key) -> Slot | None:
        with self.lock:
            kept = self.by_runtime.get(rt, {}).get(key)
            return kept.pop() if kept else None

    def park(self, rt, key, slots: list, most: int) -> list:
        """Keep up to `most` slots under `key`; returns those not kept (to be destroyed)."""
        with self.lock:
            rings = self.by_runtime.setdefault(rt, OrderedDict())
            kept = rings.pop(key, [])
            room = max(0, most - len(kept))
            kept += slots[:room]
            rings[key] = kept
            extra = slots[room:]
            while len(rings) > IDLE_RINGS:
                extra += rings.pop(next(iter(rings)))
            return extra

    def drain(self, rt) -> list:
        with self.lock:
            rings = self.by_runtime.pop(rt, {})
            return [slot for kept in rings.values() for slot in kept]


_IDLE = _IdleSlots()


def release_idle(rt) -> int:
    """Give back the slots `rt` keeps for later rings (IDLE_RINGS); returns how many."""
    slots = _IDLE.drain(rt)
    for slot in slots:
        destroy_slot(rt, slot)
    return len(slots)


@dataclass
class Rows:
    """A region's captured pages as arrays: their indices and bytes, row k holding page
    pages[k]; a short last page (a region's size need not be whole pages) apart, as a piece."""
    pages: np.ndarray
    rows: np.ndarray
    tail: list

    @classmethod
    def of(cls, region, rs: RegionSlot, pages: np.ndarray, rows: np.ndarray) -> "Rows":
        last = region.n_pages - 1
        if not rs.short_last or not (hit := np.flatnonzero(pages == last)).size:
            return cls(pages, rows, [])
        keep = pages != last
        return cls(pages[keep], rows[keep], [(last, bytes(rows[hit[0], :region.page_bytes(last)]))])

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + sum(len(d) for _, d in self.tail)


def streamable(st) -> bool:
    """A region captured in the stream (a slot share of its own), not at enqueue."""
    return st.scanner is not None or (st.mode == "shadow" and st.native is None)


def ring_gathered(st) -> bool:
    """A region design (b) or the forked gather may gather beside the stream, after the
    capture point (ring_gather's docstring): the steps after it write none of its listed pages."""
    return device_listed(st) and getattr(st.scanner, "append_only", False)


def snapshot_scanned(st) -> bool:
    """A region device_side="fork" copies in the stream and scans beside it (SNAPSHOT_BYTES)."""
    return (st.scanner is None and st.mode == "shadow" and st.native is None
            and st.region.n_words * 4 <= SNAPSHOT_BYTES)


def device_listed(st) -> bool:
    """A region whose scanner lists its pages on the device (BlockTableScanner)."""
    return getattr(st.scanner, "device_lister", False)


def host_listed(st) -> bool:
    """A region whose pages a host scanner lists (the list goes to the device by copy)."""
    return st.scanner is not None and not device_listed(st)


def host_bounded(st) -> bool:
    """A host-listed region whose scanner says how many pages a step touches at most."""
    return host_listed(st) and getattr(st.scanner, "pages_a_step", None) is not None


def entries_a_step(st) -> int:
    """A device list's entries for one decode step (a slot per plane and sequence)."""
    return st.scanner.planes * st.scanner.batch


def list_capacity(st, slot_bytes: int) -> int:
    """A device list's room in a slot: the slot budget, and at least 4 steps' entries."""
    return max(slot_bytes // st.region.page_size, 4 * entries_a_step(st))


def capture_region_now(st) -> list:
    """A region's (page, bytes) pieces, found and copied in the caller's thread."""
    pages = st.find_dirty()
    pieces = list(st.gather(pages))
    st.after_commit(pages)
    return pieces


def check_capacity(region, n: int, capacity: int):
    if n > capacity:
        raise ConcordiaError(f"region {region.name!r}: {n} dirty pages, more than a staging slot "
                             f"holds ({capacity}); raise slot_bytes or checkpoint more often")

"""Asynchronous, stream-ordered checkpoints: the caller's thread enqueues, a writer makes durable.

    handle = ckpt.checkpoint_async(stream)   # returns at once; the caller goes on writing
    ...
    handle.result()                           # this checkpoint is durable
    ckpt.flush(); ckpt.durable_id             # all of them; the last durable one

On a backend with streams and graphs (cuda), what the caller's thread does is enqueue, on the
caller's stream, one replay of a ring slot's graph (the slots: staging_ring.py): each region's page list (a host scanner's,
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

With device_side="fork" a block table's KV gather (its pages are not written by the steps
after the capture) and the scans of shadow-compared regions (from a copy made in the stream)
run as a second graph on the backend's side stream, after an event in the caller's; the
slot's event is then the side stream's (staging_ring.py). With device_side="ring" the KV
gather runs on the persistent kernel (ring_gather.py).

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

from concordia_ir.errors import ConcordiaError

from .compaction import BackgroundCompaction
from .regions import CheckpointStats
from .ring_gather import check_eager_loading
# HOST_LIST_STEPS and MAX_BRANCHES are the staging ring's, named here too for callers and tests
from .staging_ring import (HOST_LIST_STEPS, MAX_BRANCHES, MAX_COALESCE, Rows, Slot,  # noqa: F401
                           StagingRing, capture_region_now, device_listed, entries_a_step,
                           list_capacity, ring_gathered, snapshot_scanned, streamable)

WHEN_FULL = ("wait", "coalesce")
# where a capture's gather runs (module docstring); "auto": fork where a block table's KV
# region can be gathered beside the stream, else stream
DEVICE_SIDES = ("auto", "stream", "fork", "ring")
# Records the writer appends between two releases of the GIL. A thread waiting for the GIL gets
# it only when the holder drops it, after up to sys.getswitchinterval() (5 ms) of pure Python:
# a decode thread back from its device wait would sit behind the writer for that long.
YIELD_EVERY = 16
# ... or bytes: a region's scatter record is one call whatever its size (its CRC and copy hold
# the GIL for its bytes); a yield after each region was one after each of the Hugging Face
# guard's 58 small regions, and each could wait a switch interval to get the GIL back
YIELD_BYTES = 256 << 10
# How long the writer holds a fresh capture back, waiting for the caller's next one (see _hold).
HOLD_S = 0.005


def check_device_side(rt, states, device_side: str) -> str:
    """The device side to use: "auto" resolved (fork where the backend has streams and graphs
    and a region is a block table's append-only KV cache: its gather is most of a capture's
    device time), or "ring" or "fork" checked where they can run: a backend with streams and
    graphs (and for "ring" a resident kernel), and a region it may gather beside the stream
    (ring_gather's docstring)."""
    b = rt.backend
    if device_side == "auto":
        fork = b.streams and b.graphs and any(ring_gathered(st) for st in states)
        return "fork" if fork else "stream"
    if device_side == "stream":
        return device_side
    if not (b.streams and b.graphs and (device_side == "fork" or b.resident_groups() is not None)):
        needs = "streams and graphs" + (" and a resident kernel" if device_side == "ring" else "")
        raise ConcordiaError(f"device_side={device_side!r} needs a backend with {needs} (cuda); "
                             f"{b.name} has none")
    if not any(ring_gathered(st) or (device_side == "fork" and snapshot_scanned(st)) for st in states):
        also = " or scanned against a shadow copy" if device_side == "fork" else ""
        raise ConcordiaError(f"device_side={device_side!r} gathers only regions whose pages the "
                             "steps after a checkpoint do not write: a BlockTableScanner's KV cache "
                             f"with one slot a page{also} (none here)")
    if device_side == "ring":
        check_eager_loading()
    return device_side


def check_ring(slots: int, when_full: str, device_side: str = "auto") -> None:
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
class _Capture:
    id: int
    handle: CheckpointHandle
    slot: Slot | None = None        # the ring slot it holds until the writer has logged it
    event: object = None
    counts: list = field(default_factory=list)   # pages per region; None: count on the device
    pieces: list | None = None      # (region id, [(page, bytes)]) for captures made at once
    coalesced: list = field(default_factory=list)
    released: bool = False          # its slot is back in the ring
    ring_tasks: list = field(default_factory=list)   # its gathers on the persistent kernel
    base: list | None = None        # a base image read at the call: (region, its pieces)


class CheckpointWriter:
    """The writer thread of one Checkpointer and the bound on its staging ring (StagingRing,
    staging_ring.py); see the module docstring."""

    def __init__(self, ckpt, slots: int = 4, slot_bytes: int = 16 << 20, when_full: str = "wait",
                 compact_at_bytes: int | None = None, device_side: str = "stream"):
        check_ring(slots, when_full, device_side)   # "auto" is the Checkpointer's to resolve
        self.ckpt, self.rt, self.when_full = ckpt, ckpt.rt, when_full
        self.compact_at = compact_at_bytes
        self.compactions: list[dict] = []   # seconds, bytes before and after, each time
        self.compacting = threading.Lock()  # held while the log is being swapped
        self.compaction: BackgroundCompaction | None = None   # one under way
        self.reapers: list[threading.Thread] = []   # old logs being removed
        self.backend = self.rt.backend
        self.free: queue.Queue = queue.Queue()   # the ring: captures in flight hold its slots
        self.staging = StagingRing(self.rt, ckpt.states, slots, slot_bytes, device_side)
        self.streams = self.staging.streams
        for slot in self.staging.made:
            self.free.put(slot)
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

    def _coalesce_bound(self, slot_bytes: int) -> int:
        """Checkpoints coalesced in a row at most. Where every list is a device list (a block
        table's: a known number of entries a step) or a device scan (at most the region), as
        many as a slot's lists hold, less the step that ends them; where a host scanner lists
        pages (any number a step), MAX_COALESCE."""
        steps = []
        for st in self.ckpt.states:
            if device_listed(st):
                steps.append(list_capacity(st, slot_bytes) // entries_a_step(st) - 1)
            elif st.scanner is not None and streamable(st):
                return MAX_COALESCE
        return max(MAX_COALESCE, min(steps)) if steps else MAX_COALESCE

    # -- the caller's side
    def overflows(self) -> bool:
        """A host scanner lists more pages than its share of a slot holds (after a long
        pause between checkpoints): the Checkpointer takes this one at once instead."""
        return any(len(scanner.dirty_pages()) > cap for scanner, cap in self.staging.bounded)

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
                replay = self.staging.replay(slot, stream)
                cap.counts, cap.event, cap.ring_tasks = replay.counts, replay.event, replay.ring_tasks
                cap.handle.phases.update(replay.phases)
            else:
                cap.pieces = [(st.region.id, capture_region_now(st)) for st in self.ckpt.states]
        except BaseException:
            self.ckpt.checkpoint_id -= 1
            self.free.put(slot)
            raise
        self.enqueued_id = cap.id
        self.pending.put(cap)
        cap.handle.enqueue_s = time.perf_counter() - t0
        return cap.handle

    def enqueue_base(self, regions: list) -> CheckpointHandle:
        """A base image read at the call (Checkpointer._read_base, which numbered it), for the
        writer to append and commit ahead of the checkpoints after it: the first call of a
        Hugging Face guard waited for its appends and fsync (4-7 and 1-2 ms of 13-18 on an
        H100 at 64 tokens)."""
        t0 = time.perf_counter()
        cap = _Capture(self.ckpt.checkpoint_id, CheckpointHandle(self.ckpt.checkpoint_id),
                       released=True, base=regions)
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
            slot = self.staging.take_new()   # every slot made so far is in flight
            if slot is not None:
                return slot
            if self.when_full == "coalesce" and len(self.coalesced) < self.max_coalesce:
                return None
            try:
                return self.free.get(timeout=0.05)
            except queue.Empty:
                self.raise_error()

    @property
    def ring(self) -> list:
        """The staging slots made so far."""
        return self.staging.made

    @property
    def gather_ring(self):
        """Design (b)'s RingGather, or None."""
        return self.staging.gather_ring

    @property
    def bounded(self) -> list:
        """(host scanner, its share's capacity) for each scanner that bounds its pages a step."""
        return self.staging.bounded

    def synced(self, checkpoint_id: int):
        """A synchronous checkpoint (Checkpointer.checkpoint) was committed: it is the newest."""
        self.durable_id = self.enqueued_id = self.processed_id = checkpoint_id

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
            self.staging.release()

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
        if cap.base is not None:
            return self._write_base(cap)
        t_write = time.perf_counter()
        if cap.pieces is None:
            self.backend.wait_event(cap.event)   # asleep, not polling: see wait_event
            for tasks in cap.ring_tasks:
                self.gather_ring.wait(tasks)
        t_device = time.perf_counter()
        pieces = cap.pieces if cap.pieces is not None else self.staging.pieces(cap.slot, cap.counts)
        t_pieces = time.perf_counter()
        pages, nbytes = self._append(pieces)
        t_append = time.perf_counter()
        info = self.ckpt.log.commit_info(cap.id, pages, nbytes, False, str(self.rt.spec), asynchronous=True)
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

    def _write_base(self, cap: _Capture):
        """A base image read at the call: its layout record, each region's pieces (the pages
        of zeros left out), and its commit, as Checkpointer.checkpoint writes one."""
        t_write, log, gil = time.perf_counter(), self.ckpt.log, _Yielder()
        log.write_layout(self.ckpt.layout)
        pages = nbytes = 0
        for region, pieces in cap.base:
            k, b = log.append_base(region.id, region.page_size, pieces, region.nbytes)
            pages, nbytes = pages + k, nbytes + b
            gil.wrote(1, b)
        info = log.commit_info(cap.id, pages, nbytes, True, str(self.rt.spec), asynchronous=True)
        t_append = time.perf_counter()
        log.commit(cap.id, info, sync=False)
        cap.base = None   # the host copies go
        self.busy["append"] += t_append - t_write
        self.busy["commit"] += time.perf_counter() - t_append
        cap.handle.phases["write"] = time.perf_counter() - t_write
        cap.handle.stats = CheckpointStats(cap.id, pages, nbytes,
                                           time.perf_counter() - cap.handle._enqueued_at, True)

    def _append(self, pieces: list) -> tuple[int, int]:
        """A capture's pieces into the log: pages and bytes appended. The regions' arrays go
        in together (DeltaLog.append_scatters), YIELD_BYTES at a time, with little Python a
        region (the Hugging Face guard's 58 regions a token: its appends 0.96 -> 0.52 ms)."""
        log, page_size = self.ckpt.log, self.ckpt.page_size
        pages = nbytes = size = 0
        gil, arrays = _Yielder(), []
        for region_id, items in pieces:
            if isinstance(items, Rows):
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

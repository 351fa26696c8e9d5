"""A persistent kernel that consumes a task ring: dispatch without a launch per task.

One kernel, generated from IR (handlers/dispatcher.py), stays resident: each work-group claims
the next task from a ring in host-mapped memory, runs the registered handler the task names (an
IR kernel, inlined into the dispatcher's op table and lowered by the same templates as every
kernel), and marks the task done. Registering or replacing a handler builds a new op table and
hot-swaps the kernel between two tasks. This module is the host side: the ring, publishing,
waiting, the watchdog. docs/persistent.md gives the protocol and its memory-ordering argument.

ring (mapped): a record a slot, each word as two tagged wire words (dispatcher.py); a record is
published once every wire word carries its task's tag. done (mapped): per slot, seq + 1 of the
task that last completed there. claim (device): [0] the next task index to take, [1] tasks
known published (raised by the group that finds a batch's first record). halt (device, written
beside the running kernel): no group starts a task once it is set, so a task is either
complete or was never started.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from concordia_ir.errors import ConcordiaError, TaskError
from concordia_ir.ops import Kernel
from concordia.backends.runtime import DeviceBuffer
from concordia.handlers.deferred_stores import DEFAULT_DEFER, MAX_DEFER
from concordia.handlers.dispatcher import (ARG_WORDS, HEADER_WORDS, RECORD_WORDS,  # noqa: F401
                                           RUN_WORD, TAG_MASK, TRACE_POINTS, WIRE_WORDS, Handler,
                                           build_dispatcher, make_handler)


PUBLISH_BATCH = 256  # records written per step of a long publish
TAGS = np.array([1 << 16, 2 << 16], np.uint32)   # a word's tag, by the parity of its task's lap
RUNS = np.arange(PUBLISH_BATCH, 0, -1, dtype=np.uint32)   # RUNS[-k:]: a k-record batch's runs
_RUN_LOW = 2 * RUN_WORD   # the wire word with the run's low half (runs stay below 1 << 16)
ROW = WIRE_WORDS * 4      # a record's bytes in the ring


@dataclass
class Task:
    seq: int
    op: str
    args: tuple
    groups: tuple             # (first group, group count, total groups)


@dataclass
class SwapStats:
    compile_s: float
    drain_s: float = 0.0
    switch_s: float = 0.0
    tasks_before: int = 0

    @property
    def pause_s(self) -> float:
        """How long no task could run: draining the ring and switching kernels."""
        return self.drain_s + self.switch_s


# ---- the host side ---------------------------------------------------------------------------

def _wire_forms(records: np.ndarray) -> np.ndarray:
    """Records (x RECORD_WORDS i32) as the ring holds them, in both tags (2 x records x
    WIRE_WORDS; each tag's records contiguous, so a batch is one plain copy): wire word 2k
    holds word k's low 16 bits, 2k + 1 its high 16 bits, each under the tag."""
    halves = np.ascontiguousarray(records, np.int32).view(np.uint16).astype(np.uint32)
    return halves[None, :, :] | TAGS[:, None, None]


def _source_of(records: np.ndarray) -> tuple[memoryview | None, bool]:
    """Records for publish(), checked: their bytes where they can be copied whole (None:
    they go through numpy), and whether they are one batch as encode_tasks made it (its
    runs right: the first record's is n, the last one's 1; in lap 0's tag, 1 << 16 | run)."""
    if records.ndim != 3 or records.shape[0] != 2 or records.shape[2] != WIRE_WORDS:
        raise ConcordiaError(f"publish() takes records from encode_tasks() (2 x records x "
                             f"{WIRE_WORDS}), got an array of shape {records.shape}")
    n = records.shape[1]
    runs_right = (0 < n <= PUBLISH_BATCH and records[0, 0, _RUN_LOW] == 0x10000 | n
                  and records[0, -1, _RUN_LOW] == 0x10001)
    whole = records.flags.c_contiguous and records.itemsize == 4
    return (memoryview(records).cast("B") if whole else None), bool(runs_right)


@dataclass
class _Running:
    kernel: Kernel
    run: object               # the backend's detached launch: done(), wait(timeout)


class PersistentRuntime:
    """A resident dispatcher on one Runtime, fed through a task ring.

    >>> pr = PersistentRuntime(rt, blocks=8)
    >>> pr.register("scale", scale_kernel, [x])        # compile the op table
    >>> pr.start()
    >>> task = pr.submit("scale", groups=4, args=(2.0,))
    >>> pr.wait([task]); pr.shutdown()
    """

    def __init__(self, runtime, blocks: int = 8, block_size: int = 256, ring_slots: int = 1024,
                 watchdog_s: float = 10.0, trace: bool = False,
                 defer_stores: int = DEFAULT_DEFER):
        if ring_slots < 1 or blocks < 1:
            raise ConcordiaError("ring_slots and blocks must be >= 1")
        if not 1 <= defer_stores <= MAX_DEFER:
            raise ConcordiaError(f"defer_stores must be 1 to {MAX_DEFER} (virtual groups whose "
                                 f"loads go before their stores), got {defer_stores}")
        self.defer_stores = defer_stores
        if block_size < WIRE_WORDS:
            raise ConcordiaError(f"block_size must be >= {WIRE_WORDS} (a record is read by that "
                                 "many work-items)")
        resident = runtime.backend.resident_groups()
        if resident is not None:   # more would deadlock: a spinning group waits on one that never runs
            blocks = min(blocks, resident)
        self.rt, self.blocks, self.block_size = runtime, blocks, block_size
        self.slots, self.watchdog_s = ring_slots, watchdog_s
        self.ring = runtime.mapped(ring_slots * WIRE_WORDS, np.int32)
        self.wire = self.ring.host.view(np.uint32).reshape(ring_slots, WIRE_WORDS)   # a record a row
        # the ring and the marks as memoryviews: a slice copy is ~0.3 us cheaper than ctypes'
        # memmove, and an item read ~80 ns cheaper than numpy's, on a one-record dispatch's
        # ~5 us critical path (the CPU box: 180-260 against 550 ns, 33 against 117 ns)
        self._wire_bytes = memoryview(self.wire).cast("B")
        self._source = (None, None, False)   # the records last published: (them, bytes, runs right)
        self.done = runtime.mapped(ring_slots, np.int32)
        self.done_words = self.done.host
        self._done_items = memoryview(self.done_words)
        self.claim = runtime.zeros(2, np.int32)   # next index, tasks known published
        self.halt = DeviceBuffer(runtime, runtime.backend.alloc_control(4), np.int32, 1)
        # trace: each task's phases stamped by the device clock (where the target has one)
        # (host-mapped: read while the kernel runs, with no synchronisation that would wait
        # for it; the stamps' stores cross the bus before the completion mark's fence)
        self.trace = runtime.mapped(ring_slots * TRACE_POINTS, np.uint64) if trace else None
        self.handlers: list[Handler] = []
        self.kernel: Kernel | None = None
        self.running = None
        self.head = 0                         # tasks published
        self.complete_below = 0               # every task below this one is known complete
        self.tasks: dict[int, Task] = {}      # published, not yet seen complete
        self.failed: TaskError | None = None
        self.swaps: list[SwapStats] = []

    # -- the op table
    def register(self, name: str, kernel, buffers) -> SwapStats:
        """Add or replace a handler. While running, the kernel is hot-swapped between tasks:
        the new op table is compiled first, then the ring drains and the kernels switch."""
        return self.register_many([(name, kernel, buffers)])

    def register_many(self, items) -> SwapStats:
        """register() for several (name, kernel, buffers) at once: one op table, one compile."""
        handlers = list(self.handlers)
        for name, kernel, buffers in items:
            h = make_handler(name, kernel, buffers)
            at = next((i for i, x in enumerate(handlers) if x.name == name), None)
            if at is None:
                handlers.append(h)
            else:
                handlers[at] = h
        t0 = time.perf_counter()
        new = build_dispatcher(handlers, self.slots, trace=self.trace is not None,
                               defer=self.defer_stores)
        self.rt.backend.prebuild(new)   # compile now; loading waits until the old kernel stops
        stats = SwapStats(time.perf_counter() - t0, tasks_before=self.head)
        if self.running is not None:
            t1 = time.perf_counter()
            self.wait()
            t2 = time.perf_counter()
            self._stop_kernel()
            self.handlers, self.kernel = handlers, new
            self._launch()
            stats.drain_s, stats.switch_s = t2 - t1, time.perf_counter() - t2
            self.swaps.append(stats)
        else:
            self.handlers, self.kernel = handlers, new
        return stats

    def op_id(self, name: str) -> int:
        for i, h in enumerate(self.handlers):
            if h.name == name:
                return i
        raise ConcordiaError(f"no handler {name!r}; registered: "
                             f"{', '.join(h.name for h in self.handlers) or 'none'}")

    # -- lifecycle
    def start(self):
        if self.kernel is None:
            raise ConcordiaError("register at least one handler before start()")
        if self.running is None:
            self._launch()
        return self

    def _launch(self):
        self.halt.write(np.zeros(1, np.int32))
        self.claim.write(np.array([self.head, self.head], np.int32))   # claims go on from head
        args = [self.ring, self.done, self.claim, self.halt] + \
            ([self.trace] if self.trace is not None else []) + \
            [b for h in self.handlers for b in h.buffers]
        k, g, l, handles = self.rt.check_launch(self.kernel, self.blocks * self.block_size,
                                                self.block_size, args)
        self.running = _Running(k, self.rt.backend.launch_detached(k, handles, g, l))

    def _set_halt(self):
        self.rt.backend.write_control(self.halt.handle, np.ones(1, np.int32))

    def _stop_kernel(self, timeout: float | None = None) -> bool:
        self._set_halt()
        ok = self.running.run.wait(timeout if timeout is not None else self.watchdog_s)
        if ok:
            self.running = None
        return ok

    def shutdown(self) -> list[Task]:
        """Stop after the published tasks (a clean shutdown); returns the tasks not completed
        (none unless a task failed or hung). After a failure no group starts another task, so
        each returned task either never ran or is the one that faulted or hung (if that one
        is still running when the watchdog gives up, the kernel stays resident until it ends)."""
        if self.running is not None and self.failed is None:
            try:
                self.wait()
            except TaskError:
                pass
        if self.running is not None:
            self._stop_kernel()
        return self.pending()

    def stamps(self, first: int, end: int) -> np.ndarray:
        """Device-clock stamps (ns) of completed tasks [first, end), one row each: claimed,
        seen published, record read, handler done, completion marked (trace=True only; the
        newest `ring_slots` tasks), read from host-mapped memory while the kernel runs."""
        if self.trace is None:
            raise ConcordiaError("stamps() needs PersistentRuntime(..., trace=True)")
        rows = self.trace.host.reshape(self.slots, TRACE_POINTS)
        return rows[np.arange(first, end) % self.slots].copy()

    def pending(self) -> list[Task]:
        self._collect()
        return [self.tasks[s] for s in sorted(self.tasks)]

    # -- tasks
    def submit(self, name: str, groups: int, args=(), split: int | None = None) -> list[Task]:
        """Publish one task of `groups` work-groups (split into records of at most `split`
        groups each, which different work-groups of the dispatcher take in parallel)."""
        return self.submit_many(name, [args], groups, split)

    def submit_many(self, name: str, arg_rows, groups: int, split: int | None = None) -> list[Task]:
        records = self._records(name, arg_rows, groups, split)
        aw = self.handlers[self.op_id(name)].arg_words
        args = records[:, HEADER_WORDS:HEADER_WORDS + aw].tolist()
        spans = records[:, 1:RUN_WORD].tolist()   # first group, group count, total groups
        out = [Task(self.head + k, name, tuple(a), tuple(g)) for k, (a, g) in enumerate(zip(args, spans))]
        self.tasks.update((t.seq, t) for t in out)
        self.publish(_wire_forms(records))
        return out

    def _records(self, name: str, arg_rows, groups: int, split: int | None = None) -> np.ndarray:
        """Each row's task as records (x RECORD_WORDS), one after another: groups [0, split),
        [split, 2 split)..."""
        if self.failed is not None:
            raise ConcordiaError(f"the persistent runtime has failed: {self.failed}")
        op = self.op_id(name)
        h = self.handlers[op]
        if groups < 1:
            raise ConcordiaError("a task needs at least one group")
        split = max(1, min(split or groups, groups))
        words = self._encode_rows(h, arg_rows)
        firsts = np.arange(0, groups, split, dtype=np.int32)
        recs = np.zeros((len(words), len(firsts), RECORD_WORDS), np.int32)
        recs[:, :, 0], recs[:, :, 1], recs[:, :, 3] = op, firsts, groups
        recs[:, :, 2] = np.minimum(split, groups - firsts)
        recs[:, :, HEADER_WORDS:HEADER_WORDS + words.shape[1]] = words[:, None, :]
        recs = recs.reshape(-1, RECORD_WORDS)
        recs[:, RUN_WORD] = np.minimum(np.arange(len(recs), 0, -1), TAG_MASK)   # runs, as one batch
        return recs

    def encode_tasks(self, name: str, arg_rows, groups: int, split: int | None = None) -> np.ndarray:
        """Records for tasks, ready to publish (2 x records x WIRE_WORDS): each in both of its
        wire forms, since a slot's tag alternates between its uses (records[:, a:b] is a
        part of them; np.repeat(records, k, axis=1) repeats them). submit_many publishes them
        at once; publish() takes records built once and published many times (what a serving
        loop that repeats the same tasks does; also what the dispatch benchmark times: the bus
        and the kernel, not Python's argument encoding)."""
        return _wire_forms(self._records(name, arg_rows, groups, split))

    def publish(self, records: np.ndarray) -> tuple[int, int]:
        """Publish records from encode_tasks(); returns the task range [first, end) for
        wait_range(). Each record goes into its slot tagged in every word (there is no head
        word: a record is published once all its words carry its tag), with its run: the
        records from it to its batch's end, so that the group that finds a batch's first
        record lets the holders of the rest go. Long publishes go in batches of up to 256.
        Records published again (a serving loop's, the benchmark's) are checked once: change
        them in place only as encode_tasks would have made them."""
        if self.failed is not None:
            raise ConcordiaError(f"the persistent runtime has failed: {self.failed}")
        if records is not self._source[0]:
            self._source = (records, *_source_of(records))
        _, source, runs_right = self._source
        first, n = self.head, records.shape[1]
        # the common case: one batch as encode_tasks made it, its slots known free. Every
        # statement here is on the dispatch's critical path
        if source is not None and runs_right and first + n - self.slots <= self.complete_below \
                and first % self.slots + n <= self.slots:
            # its first record last, by two slice copies: numpy's indexing and assignment took
            # ~1 us a statement (a third of a one-record publish, 3 of 5 us of a 64-record
            # one on the CPU box). A memoryview's slice copy is libc's memcpy, which, like
            # numpy's copy, writes aligned words whole (all the tags need: docs/persistent.md)
            src = ((first // self.slots) & 1) * n * ROW
            dst = first % self.slots * ROW
            wire = self._wire_bytes
            if n > 1:
                wire[dst + ROW:dst + n * ROW] = source[src + ROW:src + n * ROW]
            wire[dst:dst + ROW] = source[src:src + ROW]
            self.head = first + n
            return first, first + n
        batch = min(PUBLISH_BATCH, self.slots)
        for at in range(0, n, batch):
            chunk = records[:, at:at + batch]
            self._wait_slots(first + at, chunk.shape[1])
            self._write_batch(first + at, chunk, runs_right=runs_right and chunk.shape[1] == n)
            self.head = first + at + chunk.shape[1]
        return first, first + n

    def _write_batch(self, seq0: int, rows: np.ndarray, runs_right: bool):
        """Rows (2 x k x WIRE_WORDS) for tasks seq0... into their slots, each in its lap's tag;
        the batch's first record last: on a host that keeps its stores in order, the group
        that finds it whole finds the others there too (the tags keep it right on any host)."""
        k, s0 = rows.shape[1], seq0 % self.slots
        fit, lap = min(k, self.slots - s0), (seq0 // self.slots) & 1
        here, wrapped = rows[lap, :fit], rows[lap ^ 1, fit:]
        if not runs_right:
            here, wrapped = here.copy(), wrapped.copy()
            here[:, _RUN_LOW] = RUNS[-k:][:fit] | TAGS[lap]
            wrapped[:, _RUN_LOW] = RUNS[-k:][fit:] | TAGS[lap ^ 1]
        if fit < k:
            self.wire[:k - fit] = wrapped
        if fit > 1:
            self.wire[s0 + 1:s0 + fit] = here[1:]
        self.wire[s0] = here[0]

    def wait_range(self, first: int, end: int) -> None:
        """Until tasks [first, end) from publish() are complete (spins; watchdog applies)."""
        if end - first == 1:   # one record: spin on its word with no setup first
            done, slot = self._done_items, first % self.slots
            for _ in range(2000):
                if done[slot] > first:
                    self._known_complete(first, end)
                    return
            self._wait_complete(first, end)   # a long wait: the spin with the watchdog
        elif end > first:
            s0, n = first % self.slots, end - first
            if s0 + n <= self.slots and self._stretch_done(first, end):
                self._known_complete(first, end)
                return
            self._wait_complete(first, end)

    def _stretch_done(self, first: int, end: int) -> bool:
        """Spin until tasks [first, end), in one stretch of slots, are complete; False if it
        takes long (the caller then waits with the watchdog). The last record's word first,
        then the stretch's smallest word, and if that one is not there yet a spin on it alone:
        one numpy reduction a straggler, not one a turn."""
        s0, n = first % self.slots, end - first
        done, words = self._done_items, self.done_words[s0:s0 + n]
        at, want = s0 + n - 1, end
        for _ in range(64):
            for _ in range(2000):
                if done[at] >= want:
                    break
            else:
                return False
            k = int(words.argmin())
            if words[k] > first:
                return True
            at, want = s0 + k, first + k + 1
        return False

    def _wait_slots(self, seq0: int, n: int):
        """Until the slots of tasks [seq0, seq0 + n) are free: their previous occupants, the
        tasks `slots` earlier, complete (unless the watermark already says so)."""
        end = seq0 + n - self.slots
        if end > self.complete_below:
            self._wait_complete(max(0, seq0 - self.slots), end)

    def _wait_complete(self, first: int, end: int, since: float | None = None) -> None:
        """Until tasks [first, end) are complete, in any order; then raise the watermark of
        tasks known complete. Tasks older than the last `slots` are complete already: their
        slots were reused. The watchdog counts from `since` (default: now)."""
        t0 = time.monotonic() if since is None else since
        lo = max(first, end - self.slots)
        # records are claimed in order: the last one is the likely last to finish, and a
        # vector spin over many words keeps pulling the lines the device writes its marks
        # into; so one word a spin, then the rest (a few words one by one, more by the
        # range's minimum, which costs less than numpy's per-call overhead only for many)
        self._spin_until_done(end - 1, t0)
        if end - lo <= 8:
            done, slots = self._done_items, self.slots
            for seq in range(lo, end - 1):
                if done[seq % slots] <= seq:
                    self._spin_until_done(seq, t0)
        else:
            while not any(self._range_done(lo, end) for _ in range(200)):
                self._check_alive(t0)
        self._known_complete(first, end)

    def _known_complete(self, first: int, end: int):
        """Tasks [first, end) are complete: raise the watermark if it reaches them."""
        if first <= self.complete_below:
            self.complete_below = max(self.complete_below, end)

    def _range_done(self, first: int, end: int) -> bool:
        """Are tasks [first, end) (at most `slots` of them) complete? A slot's word holds seq + 1
        of its task once complete, and before that its previous occupant's, which is at most
        end - slots <= first: so the range is complete exactly when the smallest word of its
        slots exceeds `first` (one or two slice minima, no index arrays)."""
        d, s0, n = self.done_words, first % self.slots, end - first
        if s0 + n <= self.slots:
            return int(d[s0:s0 + n].min()) > first
        return int(min(d[s0:].min(), d[:s0 + n - self.slots].min())) > first

    def _spin_until_done(self, s: int, since: float):
        done, slot, target = self._done_items, s % self.slots, s + 1
        while done[slot] < target:
            for _ in range(2000):          # a short spin first: latency is the point
                if done[slot] >= target:
                    break
            else:
                self._check_alive(since)

    def _encode_rows(self, h: Handler, arg_rows) -> np.ndarray:
        """Each row's scalars as record words (rows x h.arg_words), a column at a time: each
        value in its parameter's dtype, padded to whole words, 64-bit ones low word first."""
        rows = [tuple(r) for r in arg_rows]
        for row in rows:
            if len(row) != len(h.scalars):
                raise ConcordiaError(f"handler {h.name!r} takes {len(h.scalars)} scalar arguments "
                                     f"({', '.join(p.name for p in h.scalars)}), got {len(row)}")
        cols = [np.zeros((len(rows), 0), np.int32)]
        for j, p in enumerate(h.scalars):
            raw = np.asarray([r[j] for r in rows], dtype=p.type.dtype).reshape(len(rows), 1)
            raw = raw.view(np.uint8)
            cols.append(np.pad(raw, ((0, 0), (0, (-raw.shape[1]) % 4))).view(np.int32))
        return np.concatenate(cols, axis=1)

    def _collect(self):
        if not self.tasks:
            return
        seqs = np.fromiter(self.tasks.keys(), np.int64)
        fin = self.done_words[seqs % self.slots] >= seqs + 1
        for s in seqs[fin]:
            del self.tasks[int(s)]

    def _check_alive(self, since: float):
        run = self.running
        try:
            ended = run is not None and run.run.done()
        except ConcordiaError as e:
            self.failed = TaskError(f"the persistent kernel faulted: {e}", self.pending())
            self.running = None
            raise self.failed from None
        if ended and self.tasks:
            self._collect()
            if self.tasks:
                self.failed = TaskError("the persistent kernel stopped with tasks pending",
                                        self.pending())
                raise self.failed
        if time.monotonic() - since > self.watchdog_s:
            self._collect()
            oldest = self.tasks[min(self.tasks)] if self.tasks else None
            what = (f"task {oldest.seq} ({oldest.op}, groups {oldest.groups[0]}+{oldest.groups[1]})"
                    if oldest else "a ring slot")
            self.failed = TaskError(f"watchdog: {what} did not complete within "
                                    f"{self.watchdog_s:g} s; the kernel is being stopped",
                                    self.pending())
            self._set_halt()
            raise self.failed
        time.sleep(0)

    def wait(self, tasks: list[Task] | None = None, timeout: float | None = None) -> None:
        """Until the given tasks (default: all published) are complete; TaskError on a fault
        or when one takes longer than the watchdog."""
        if self.failed is not None:
            raise self.failed
        want = sorted(self.tasks) if tasks is None else sorted(t.seq for t in tasks)
        t0 = time.monotonic()
        saved = self.watchdog_s
        if timeout is not None:
            self.watchdog_s = timeout
        try:   # runs of consecutive tasks, each waited for as a range
            cuts = [0, *(np.flatnonzero(np.diff(want) != 1) + 1).tolist(), len(want)] if want else [0]
            for a, b in zip(cuts, cuts[1:]):
                self._wait_complete(want[a], want[b - 1] + 1, since=t0)
            for s in want:
                self.tasks.pop(s, None)
        finally:
            self.watchdog_s = saved

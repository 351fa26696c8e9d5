"""A persistent kernel that consumes a task ring: dispatch without a launch per task.

One kernel, generated from IR, stays resident: each work-group claims the next task from a
ring in host-mapped memory, runs the registered handler the task names (an IR kernel, inlined
into the dispatcher's op table and lowered by the same templates as every kernel), and marks
the task done. Registering or replacing a handler builds a new op table and hot-swaps the
kernel between two tasks. docs/persistent.md gives the memory-ordering argument.

Ring record (i32 words, RECORD_WORDS per slot): op id, first group, group count, total groups
of the task, then the handler's scalar arguments (64-bit ones as two words, low first).
ctrl (mapped): [0] head = tasks published. done (mapped): per slot, seq + 1 of the task that
last completed there. claim (device): [0] the next task index to take, [1] the head as last
seen by the group that polls the host. halt (device, written beside the running kernel): no
group starts a task once it is set, so a task is either complete or was never started.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from concordia_ir.errors import ConcordiaError, TaskError, where
from concordia_ir.builder import IRBuilder, Names
from concordia_ir.ops import Block, Kernel, Op, Value, walk
from concordia.backends.runtime import DeviceBuffer, _as_kernel
from concordia_ir.types import PtrType, boolean, i32, u32, u64
from concordia_ir.verifier import verify_kernel


RECORD_WORDS = 16
PUBLISH_BATCH = 64   # records written before the head moves
HEADER_WORDS = 4
TRACE_POINTS = 5     # per task, with trace=True: claimed, seen, record read, ran, marked
ARG_WORDS = RECORD_WORDS - HEADER_WORDS
_IDS = {"global_id", "group_id", "num_groups", "global_size", "local_id", "local_size"}


@dataclass(frozen=True)
class Handler:
    name: str
    kernel: Kernel
    buffers: tuple            # a DeviceBuffer per pointer parameter, in parameter order
    arg_words: int

    @property
    def scalars(self) -> list[Value]:
        return [p for p in self.kernel.params if not isinstance(p.type, PtrType)]


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


def make_handler(name: str, kernel, buffers) -> Handler:
    """Check that an IR kernel can join an op table and bind its buffers."""
    k = _as_kernel(kernel)
    ptrs = [p for p in k.params if isinstance(p.type, PtrType)]
    if len(buffers) != len(ptrs):
        raise ConcordiaError(f"handler {name!r}: kernel {k.name} has {len(ptrs)} buffer "
                             f"parameters ({', '.join(p.name for p in ptrs)}), got {len(buffers)} buffers")
    for p, b in zip(ptrs, buffers):
        if not isinstance(b, DeviceBuffer) or np.dtype(b.dtype) != p.type.elem.dtype:
            raise ConcordiaError(f"handler {name!r}: %{p.name} needs a device buffer of "
                                 f"{p.type.elem}, got {getattr(b, 'dtype', type(b).__name__)}")
    body = k.body.ops
    for op in walk(k.body):
        if op.name == "return" and op is not body[-1]:
            raise ConcordiaError(f"{where(op.where)}handler {name!r}: an early return; an op-table "
                                 "handler runs to its end (guard the work with an if instead)")
        if op.name in _IDS and op.name not in ("local_id", "local_size") and op.attr("dim") != 0:
            raise ConcordiaError(f"{where(op.where)}handler {name!r}: tasks are 1-D; "
                                 f"{op.name}({op.attr('dim')}) has no meaning in a task")
    words = sum(2 if p.type.bits == 64 else 1 for p in k.params if not isinstance(p.type, PtrType))
    if words > ARG_WORDS:
        raise ConcordiaError(f"handler {name!r}: {words} words of scalar arguments; a task "
                             f"record holds {ARG_WORDS}")
    return Handler(name, k, tuple(buffers), words)


# ---- the dispatcher, in IR -------------------------------------------------------------------

def build_dispatcher(handlers: list[Handler], ring_slots: int, trace: bool = False) -> Kernel:
    """The op table's resident loop. With `trace`, work-item 0 stamps each task's phases with
    the device clock (TRACE_POINTS per slot in `trace`: claimed, seen published, record read,
    handler done, completion marked); only targets with a device clock lower it."""
    ring, ctrl, done, claim, halt = (Value(n, PtrType(i32)) for n in
                                     ("ring", "ctrl", "done", "claim", "halt"))
    params = [ring, ctrl, done, claim, halt]
    stamps_out = Value("trace", PtrType(u64)) if trace else None
    if trace:
        params.append(stamps_out)
    for k, h in enumerate(handlers):
        params += [Value(f"h{k}.{p.name}", p.type) for p in h.kernel.params
                   if isinstance(p.type, PtrType)]
    b = IRBuilder(Names(taken={p.name for p in params}, prefix="cc."))
    c = lambda v, t=i32: b.const(v, t)   # noqa: E731
    lid = b.op("local_id", (), i32, (("dim", 0),))
    # [0] task, [1] quit, [2...] the task's record: read once over the bus, kept in local memory
    shared = b.op("local_alloc", (), PtrType(i32, "local"), (("size", 2 + RECORD_WORDS),))
    zero = c(0)
    is0 = b.op("eq", (lid, zero), boolean)
    stamps = b.op("local_alloc", (), PtrType(u64, "local"), (("size", 2),)) if trace else None

    def stamp(into: IRBuilder, at: Value):   # the device clock into local stamps[at]
        if trace:
            into.op("store", (stamps, at, into.op("clock", (), u64)))

    # Work-item 0 claims a task index and waits until it is published or halt is set. Only
    # the group holding the next unpublished index (the leader) polls the host's head over
    # the bus; it mirrors it into device memory (claim[1]), where the other groups wait.
    # Every group polling the bus at once makes every read slow.
    w = b.child()
    t = w.op("atomic_add", (claim, w.const(0, i32), w.const(1, i32)), i32, hint="task")
    stamp(w, w.const(0, i32))
    spin = w.child()
    seen = spin.op("load", (claim, spin.const(1, i32)), i32, (("volatile", 1),), hint="seen")
    lead = spin.child()
    head = lead.op("load", (ctrl, lead.const(0, i32)), i32, (("volatile", 1),), hint="head")
    lead.op("fence")
    lead.op("atomic_max", (claim, lead.const(1, i32), head), i32)
    spin.if_(spin.op("eq", (seen, t), boolean), lead)
    stopped = spin.op("load", (halt, spin.const(0, i32)), i32, (("volatile", 1),), hint="halt")
    waiting = spin.op("and", (spin.op("le", (seen, t), boolean),
                              spin.op("eq", (stopped, spin.const(0, i32)), boolean)), boolean)
    spin.condition(waiting)
    w.emit("while", regions=(spin.region(), w.child().region()))
    w.op("fence")   # acquire: the record is read after the head that published it
    stamp(w, w.const(1, i32))
    seen2 = w.op("load", (claim, w.const(1, i32)), i32, (("volatile", 1),), hint="seen")
    halted = w.op("load", (halt, w.const(0, i32)), i32, (("volatile", 1),), hint="halt")
    nothing = w.op("le", (seen2, t), boolean)
    quit_ = w.op("select", (w.op("or", (nothing, w.op("ne", (halted, w.const(0, i32)), boolean)),
                                 boolean), w.const(1, i32), w.const(0, i32)), i32)
    w.op("store", (shared, w.const(0, i32), t))
    w.op("store", (shared, w.const(1, i32), quit_))

    loop = b.child()
    loop.if_(is0, w)
    loop.op("barrier")
    task = loop.op("load", (shared, loop.const(0, i32)), i32, hint="task")
    q = loop.op("load", (shared, loop.const(1, i32)), i32, hint="quit")

    run = loop.child()
    slot = run.op("rem", (task, run.const(ring_slots, i32)), i32, hint="slot")
    base = run.op("mul", (slot, run.const(RECORD_WORDS, i32)), i32, hint="base")
    # the first RECORD_WORDS work-items read one word each: one bus transaction for the record
    copy = run.child()
    word = copy.op("load", (ring, copy.op("add", (base, lid), i32)), i32, (("volatile", 1),))
    copy.op("store", (shared, copy.op("add", (lid, copy.const(2, i32)), i32), word))
    run.if_(run.op("lt", (lid, run.const(RECORD_WORDS, i32)), boolean), copy)
    run.op("barrier")
    if trace:   # claimed, seen, record read: out to the trace buffer
        tr = run.child()
        at = tr.op("mul", (slot, tr.const(TRACE_POINTS, i32)), i32)
        for k in range(2):
            tr.op("store", (stamps_out, tr.op("add", (at, tr.const(k, i32)), i32),
                            tr.op("load", (stamps, tr.const(k, i32)), u64)))
        tr.op("store", (stamps_out, tr.op("add", (at, tr.const(2, i32)), i32),
                        tr.op("clock", (), u64)))
        run.if_(is0, tr)
    field_ = lambda n: run.op("load", (shared, run.const(2 + n, i32)), i32)  # noqa: E731
    op_id = field_(0)
    first, count, total = field_(1), field_(2), field_(3)
    end = run.op("add", (first, count), i32)
    _dispatch_chain(run, handlers, 0, op_id, first, end, total, shared)
    run.op("barrier")
    fin = run.child()
    if trace:
        at = fin.op("mul", (slot, fin.const(TRACE_POINTS, i32)), i32)
        fin.op("store", (stamps_out, fin.op("add", (at, fin.const(3, i32)), i32),
                         fin.op("clock", (), u64)))
    fin.op("fence")   # release: the task's results before its completion mark
    fin.op("store", (done, slot, fin.op("add", (task, fin.const(1, i32)), i32)))
    if trace:
        fin.op("store", (stamps_out, fin.op("add", (at, fin.const(4, i32)), i32),
                         fin.op("clock", (), u64)))
    run.if_(is0, fin)
    loop.if_(loop.op("eq", (q, loop.const(0, i32)), boolean), run)
    loop.yield_(q)

    before = b.child()
    qa = b.names.value("quit", i32)
    before.condition(before.op("eq", (qa, zero), boolean, hint="go"))
    b.emit("while", (zero,), regions=(before.region((qa,)), loop.region()))
    b.return_()
    kernel = Kernel("persistent_dispatch", tuple(params), Block((), tuple(b.ops)))
    verify_kernel(kernel)
    return kernel


def _dispatch_chain(b: IRBuilder, handlers, k, op_id, first, end, total, record):
    """if op == k: handler k over its groups; else the rest of the chain."""
    if k == len(handlers):
        return
    is_k = b.op("eq", (op_id, b.const(k, i32)), boolean)
    then = b.child()
    h = handlers[k]
    word = HEADER_WORDS
    for p in h.scalars:
        at = lambda n: then.const(2 + n, i32)   # noqa: E731
        lo = then.op("load", (record, at(word)), i32)
        dst = Value(f"h{k}.{p.name}", p.type)
        if p.type.bits == 64:
            hi = then.op("load", (record, at(word + 1)), i32)
            lo64 = then.op("cast", (then.op("bitcast", (lo,), u32),), u64)
            hi64 = then.op("cast", (then.op("bitcast", (hi,), u32),), u64)
            bits = then.op("or", (lo64, then.op("shl", (hi64, then.const(32, u64)), u64)), u64)
            then.emit("bitcast" if p.type != u64 else "add",
                      (bits,) if p.type != u64 else (bits, then.const(0, u64)), (dst,))
            word += 2
        else:
            if p.type == i32:
                then.emit("add", (lo, then.const(0, i32)), (dst,))
            elif p.type == boolean:
                then.emit("ne", (lo, then.const(0, i32)), (dst,))
            else:
                then.emit("bitcast", (lo,), (dst,))
            word += 1
    g = Value(f"h{k}.cc.group", i32)
    body = then.child()
    _inline(body, h.kernel, f"h{k}.", g, total)
    then.emit("for", (first, end, then.const(1, i32)), regions=(body.region((g,)),))
    rest = b.child()
    _dispatch_chain(rest, handlers, k + 1, op_id, first, end, total, record)
    b.if_(is_k, then, rest)


def _inline(b: IRBuilder, kernel: Kernel, prefix: str, g: Value, total: Value):
    """Appends the handler's body for virtual group g: values renamed, ids rebuilt from g."""
    def rv(v: Value) -> Value:
        return Value(prefix + v.name, v.type)

    def block(blk: Block) -> Block:
        inner = b.child()
        for op in blk.ops:
            rewrite(inner, op)
        return Block(tuple(rv(a) for a in blk.args), tuple(inner.ops))

    def rewrite(into: IRBuilder, op: Op):
        if op.name not in _IDS:
            into.ops.append(Op(op.name, tuple(rv(v) for v in op.operands),
                            tuple(rv(v) for v in op.results), op.attrs,
                            tuple(block(r) for r in op.regions), op.loc))
            return
        r, d = rv(op.result), op.attr("dim")
        b = into.child(op.loc)
        if op.name in ("local_id", "local_size"):
            b.emit(op.name, (), (r,), op.attrs)
        elif d != 0:
            b.emit("const", (), (r,), (("value", 1 if "size" in op.name or op.name == "num_groups"
                                         else 0),))
        elif op.name == "group_id":
            b.emit("add", (g, b.const(0, i32)), (r,))
        elif op.name == "num_groups":
            b.emit("add", (total, b.const(0, i32)), (r,))
        else:
            size = b.op("local_size", (), i32, (("dim", 0),))
            if op.name == "global_size":
                b.emit("mul", (total, size), (r,))
            else:
                lid = b.op("local_id", (), i32, (("dim", 0),))
                b.emit("add", (b.op("mul", (g, size), i32), lid), (r,))
        into.ops.extend(b.ops)

    ops = kernel.body.ops
    for op in (ops[:-1] if ops and ops[-1].name == "return" else ops):
        rewrite(b, op)


# ---- the host side ---------------------------------------------------------------------------

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
                 watchdog_s: float = 10.0, trace: bool = False):
        if ring_slots < 1 or blocks < 1:
            raise ConcordiaError("ring_slots and blocks must be >= 1")
        if block_size < RECORD_WORDS:
            raise ConcordiaError(f"block_size must be >= {RECORD_WORDS} (a record is read by that "
                                 "many work-items)")
        resident = runtime.backend.resident_groups()
        if resident is not None:   # more would deadlock: a spinning group waits on one that never runs
            blocks = min(blocks, resident)
        self.rt, self.blocks, self.block_size = runtime, blocks, block_size
        self.slots, self.watchdog_s = ring_slots, watchdog_s
        self.ring = runtime.mapped(ring_slots * RECORD_WORDS, np.int32)
        self.ring_rows = self.ring.host.reshape(ring_slots, RECORD_WORDS)   # a record a row
        self.ctrl = runtime.mapped(16, np.int32)
        self.done = runtime.mapped(ring_slots, np.int32)
        self.claim = runtime.zeros(2, np.int32)   # next index, head seen
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
        h = make_handler(name, kernel, buffers)
        handlers = [x for x in self.handlers if x.name != name]
        at = next((i for i, x in enumerate(self.handlers) if x.name == name), len(handlers))
        handlers.insert(at, h)
        t0 = time.perf_counter()
        new = build_dispatcher(handlers, self.slots, trace=self.trace is not None)
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
        self.ctrl.host[0] = self.head
        args = [self.ring, self.ctrl, self.done, self.claim, self.halt] + \
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
        records = self.encode_tasks(name, arg_rows, groups, split)
        h = self.handlers[self.op_id(name)]
        out = [Task(self.head + k, name,
                    tuple(rec[HEADER_WORDS:HEADER_WORDS + h.arg_words].tolist()),
                    tuple(rec[1:HEADER_WORDS].tolist())) for k, rec in enumerate(records)]
        self.tasks.update((t.seq, t) for t in out)
        self.publish(records)
        return out

    def encode_tasks(self, name: str, arg_rows, groups: int, split: int | None = None) -> np.ndarray:
        """Records for tasks: submit_many publishes them at once; publish() takes records built
        once and published many times (what a serving loop that repeats the same tasks does;
        also what the dispatch benchmark times: the bus and the kernel, not Python's argument
        encoding)."""
        if self.failed is not None:
            raise ConcordiaError(f"the persistent runtime has failed: {self.failed}")
        op = self.op_id(name)
        h = self.handlers[op]
        if groups < 1:
            raise ConcordiaError("a task needs at least one group")
        split = max(1, min(split or groups, groups))
        recs = []
        for row in arg_rows:
            w = self._encode(h, row)
            for first in range(0, groups, split):
                rec = np.zeros(RECORD_WORDS, np.int32)
                rec[:HEADER_WORDS] = (op, first, min(split, groups - first), groups)
                rec[HEADER_WORDS:HEADER_WORDS + len(w)] = w
                recs.append(rec)
        return np.array(recs, np.int32).reshape(-1, RECORD_WORDS)

    def publish(self, records: np.ndarray) -> tuple[int, int]:
        """Publish encoded records; returns the task range [first, end) for wait_range().
        The host writes them in batches of up to 64 (two slice copies where the ring wraps)
        and raises the head once a batch: the device starts on the first batch while the host
        writes the next, and the host's per-record work is not a Python loop."""
        if self.failed is not None:
            raise ConcordiaError(f"the persistent runtime has failed: {self.failed}")
        first, n = self.head, len(records)
        ring = self.ring_rows
        batch = min(PUBLISH_BATCH, self.slots)
        for at in range(0, n, batch):
            chunk = records[at:at + batch]
            seq0, k = first + at, len(chunk)
            self._wait_slots(seq0, k)
            s0 = seq0 % self.slots
            fit = min(k, self.slots - s0)
            ring[s0:s0 + fit] = chunk[:fit]
            if fit < k:          # the batch wraps around the ring's end
                ring[:k - fit] = chunk[fit:]
            self._publish(seq0 + k)
        return first, first + n

    def wait_range(self, first: int, end: int) -> None:
        """Until tasks [first, end) from publish() are complete (spins; watchdog applies)."""
        if end > first:
            self._wait_complete(first, end)

    def _wait_slots(self, seq0: int, n: int):
        """Until the slots of tasks [seq0, seq0 + n) are free: their previous occupants, the
        tasks `slots` earlier, complete (unless the watermark already says so)."""
        end = seq0 + n - self.slots
        if end > self.complete_below:
            self._wait_complete(max(0, seq0 - self.slots), end)

    def _wait_complete(self, first: int, end: int) -> None:
        """Until tasks [first, end) are complete, in any order; then raise the watermark of
        tasks known complete. Tasks older than the last `slots` are complete already: their
        slots were reused."""
        t0 = time.monotonic()
        lo = max(first, end - self.slots)
        if end - lo <= 8:   # a few scalar spins cost less than numpy's per-call overhead
            for seq in range(lo, end):
                self._spin_until_done(seq, t0)
        else:
            # records are claimed in order: the last one is the likely last to finish, and a
            # vector spin over many words keeps pulling the lines the device writes its marks
            # into; so one word a spin, then the whole range by its minimum
            self._spin_until_done(end - 1, t0)
            while not any(self._range_done(lo, end) for _ in range(200)):
                self._check_alive(t0)
        if first <= self.complete_below:
            self.complete_below = max(self.complete_below, end)

    def _range_done(self, first: int, end: int) -> bool:
        """Are tasks [first, end) (at most `slots` of them) complete? A slot's word holds seq + 1
        of its task once complete, and before that its previous occupant's, which is at most
        end - slots <= first: so the range is complete exactly when the smallest word of its
        slots exceeds `first` (one or two slice minima, no index arrays)."""
        d, s0, n = self.done.host, first % self.slots, end - first
        if s0 + n <= self.slots:
            return int(d[s0:s0 + n].min()) > first
        return int(min(d[s0:].min(), d[:s0 + n - self.slots].min())) > first

    def _spin_until_done(self, s: int, since: float):
        done, slot, target = self.done.host, s % self.slots, s + 1
        while done[slot] < target:
            for _ in range(2000):          # a short spin first: latency is the point
                if done[slot] >= target:
                    break
            else:
                self._check_alive(since)

    def _publish(self, head: int):
        # x86 and the PCIe bus keep the record stores before this one (docs/persistent.md)
        self.head = max(self.head, head)
        self.ctrl.host[0] = self.head

    def _encode(self, h: Handler, row) -> np.ndarray:
        row = tuple(row)
        if len(row) != len(h.scalars):
            raise ConcordiaError(f"handler {h.name!r} takes {len(h.scalars)} scalar arguments "
                                 f"({', '.join(p.name for p in h.scalars)}), got {len(row)}")
        words = []
        for p, v in zip(h.scalars, row):
            raw = np.asarray(v, dtype=p.type.dtype).reshape(1)
            words.extend(np.pad(raw.view(np.uint8), (0, (-raw.nbytes) % 4)).view(np.int32).tolist())
        return np.array(words, np.int32)

    def _collect(self):
        if not self.tasks:
            return
        seqs = np.fromiter(self.tasks.keys(), np.int64)
        fin = self.done.host[seqs % self.slots] >= seqs + 1
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
        want = list(self.tasks) if tasks is None else [t.seq for t in tasks]
        t0 = time.monotonic()
        saved = self.watchdog_s
        if timeout is not None:
            self.watchdog_s = timeout
        try:
            for s in sorted(want):
                self._spin_until_done(s, t0)
                self.tasks.pop(s, None)
        finally:
            self.watchdog_s = saved

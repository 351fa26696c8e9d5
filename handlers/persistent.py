"""A persistent kernel that consumes a task ring: dispatch without a launch per task.

One kernel, generated from IR, stays resident: each work-group claims the next task from a
ring in host-mapped memory, runs the registered handler the task names (an IR kernel, inlined
into the dispatcher's op table and lowered by the same templates as every kernel), and marks
the task done. Registering or replacing a handler builds a new op table and hot-swaps the
kernel between two tasks. docs/persistent.md gives the memory-ordering argument.

A record (RECORD_WORDS i32 words): op id, first group, group count, total groups of the task,
run (how many records from this one on were published together), then the handler's scalar
arguments (64-bit ones as two words, low first). In the ring (mapped) each word travels as two
wire words, its 16-bit half under the 16-bit tag (seq + 1) of the task: a record is there when
every wire word carries its tag. done (mapped): per slot, seq + 1 of the task that last
completed there. claim (device): [0] the next task index to take, [1] tasks known published
(raised by the group that finds a run's first record). halt (device, written beside the
running kernel): no group starts a task once it is set, so a task is either complete or was
never started.
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


PUBLISH_BATCH = 256  # records written per step of a long publish
RECORD_WORDS = 16    # a record: op id, first group, group count, total groups, run, arguments
WIRE_WORDS = 2 * RECORD_WORDS   # in the ring: each 16-bit half of a word beside a 16-bit tag
TAG_MASK = 0xFFFF
TAGS = np.array([1 << 16, 2 << 16], np.uint32)   # a word's tag, by the parity of its task's lap
RUNS = np.arange(PUBLISH_BATCH, 0, -1, dtype=np.uint32)   # RUNS[-k:]: a k-record batch's runs
HEADER_WORDS = 5
TRACE_POINTS = 5     # per task, with trace=True: claimed, its turn, record in hand, ran, marked
ARG_WORDS = RECORD_WORDS - HEADER_WORDS
REC = 3 + WIRE_WORDS  # where the record's words start in the dispatcher's local memory
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
    the device clock (TRACE_POINTS per slot in `trace`: claimed, its turn, record in hand,
    handler done, completion marked); only targets with a device clock lower it."""
    ring, done, claim, halt = (Value(n, PtrType(i32)) for n in ("ring", "done", "claim", "halt"))
    params = [ring, done, claim, halt]
    stamps_out = Value("trace", PtrType(u64)) if trace else None
    if trace:
        params.append(stamps_out)
    for k, h in enumerate(handlers):
        params += [Value(f"h{k}.{p.name}", p.type) for p in h.kernel.params
                   if isinstance(p.type, PtrType)]
    b = IRBuilder(Names(taken={p.name for p in params}, prefix="cc."))
    c = lambda v, t=i32: b.const(v, t)   # noqa: E731
    lid = b.op("local_id", (), i32, (("dim", 0),))
    # local memory: [0] task, [1] quit, [2] leads, then the record's wire halves, then its words
    shared = b.op("local_alloc", (), PtrType(i32, "local"), (("size", REC + RECORD_WORDS),))
    is0 = b.op("eq", (lid, c(0)), boolean)
    stamps = b.op("local_alloc", (), PtrType(u64, "local"), (("size", 2),)) if trace else None

    def stamp(into: IRBuilder, at: int):   # the device clock into local stamps[at]
        if trace:
            into.op("store", (stamps, into.const(at, i32), into.op("clock", (), u64)))

    loop = b.child()
    loop.if_(is0, _claim(loop, claim, halt, shared, stamp))
    loop.op("barrier")
    task = loop.op("load", (shared, loop.const(0, i32)), i32, hint="task")
    q = loop.op("load", (shared, loop.const(1, i32)), i32, hint="quit")
    leads = loop.op("load", (shared, loop.const(2, i32)), i32, hint="leads")

    run = loop.child()
    slot = run.op("rem", (task, run.const(ring_slots, i32)), i32, hint="slot")
    _read_record(run, ring, halt, shared, ring_slots, slot, task, lid)
    quit2 = run.op("load", (shared, run.const(1, i32)), i32, hint="quit")
    # the leader lets the groups that claimed the records published with its own go
    tell = run.child()
    run_len = tell.op("load", (shared, tell.const(REC + 4, i32)), i32, hint="run")
    tell.op("atomic_max", (claim, tell.const(1, i32), tell.op("add", (task, run_len), i32)), i32)
    ok = run.op("eq", (quit2, run.const(0, i32)), boolean)
    run.if_(run.op("and", (run.op("and", (is0, ok), boolean),
                           run.op("ne", (leads, run.const(0, i32)), boolean)), boolean), tell)
    go = run.child()
    if trace:   # claimed, its turn, record in hand: out to the trace buffer
        tr = go.child()
        at = tr.op("mul", (slot, tr.const(TRACE_POINTS, i32)), i32)
        for k in range(2):
            tr.op("store", (stamps_out, tr.op("add", (at, tr.const(k, i32)), i32),
                            tr.op("load", (stamps, tr.const(k, i32)), u64)))
        tr.op("store", (stamps_out, tr.op("add", (at, tr.const(2, i32)), i32),
                        tr.op("clock", (), u64)))
        go.if_(is0, tr)
    field_ = lambda n: go.op("load", (shared, go.const(REC + n, i32)), i32)  # noqa: E731
    op_id = field_(0)
    first, count, total = field_(1), field_(2), field_(3)
    end = go.op("add", (first, count), i32)
    _dispatch_chain(go, handlers, 0, op_id, first, end, total, shared)
    go.op("barrier")
    fin = go.child()
    if trace:
        at = fin.op("mul", (slot, fin.const(TRACE_POINTS, i32)), i32)
        fin.op("store", (stamps_out, fin.op("add", (at, fin.const(3, i32)), i32),
                         fin.op("clock", (), u64)))
    fin.op("fence")   # release: the task's results before its completion mark
    fin.op("store", (done, slot, fin.op("add", (task, fin.const(1, i32)), i32)))
    if trace:
        fin.op("store", (stamps_out, fin.op("add", (at, fin.const(4, i32)), i32),
                         fin.op("clock", (), u64)))
    go.if_(is0, fin)
    run.if_(ok, go)
    run.yield_(quit2)
    stay = loop.child()
    stay.yield_(q)
    quit_all = loop.names.value("quit", i32)
    loop.if_(loop.op("eq", (q, loop.const(0, i32)), boolean), run, stay, results=(quit_all,))
    loop.yield_(quit_all)

    before = b.child()
    qa = b.names.value("quit", i32)
    before.condition(before.op("eq", (qa, c(0)), boolean, hint="go"))
    b.emit("while", (c(0),), regions=(before.region((qa,)), loop.region()))
    b.return_()
    kernel = Kernel("persistent_dispatch", tuple(params), Block((), tuple(b.ops)))
    verify_kernel(kernel)
    return kernel


def _spin(b: IRBuilder, turn) -> tuple[Value, ...]:
    """A loop whose every turn is `turn(builder) -> (go on?, values)`; returns the values of
    its last turn."""
    body = b.child()
    more, values = turn(body)
    body.condition(more, *values)
    out = tuple(b.names.value("spun", v.type) for v in values)
    args = tuple(b.names.value("spun", v.type) for v in values)
    b.emit("while", (), out, regions=(body.region(), Block(args, (Op("yield"),))))
    return out


def _claim(b: IRBuilder, claim, halt, shared, stamp) -> IRBuilder:
    """Work-item 0 claims the next task index and waits, on device memory, until the task is
    published (claim[1], raised by leaders, has passed it), it is the next one whose record
    nobody has seen (this group leads: it polls the bus), or halt is set. Only leaders read
    the bus while waiting: every group polling host memory at once makes every read slow."""
    w = b.child()
    t = w.op("atomic_add", (claim, w.const(0, i32), w.const(1, i32)), i32, hint="task")
    stamp(w, 0)

    def turn(s: IRBuilder):
        seen = s.op("load", (claim, s.const(1, i32)), i32, (("volatile", 1),), hint="seen")
        stopped = s.op("load", (halt, s.const(0, i32)), i32, (("volatile", 1),), hint="halt")
        return s.op("and", (s.op("lt", (seen, t), boolean),
                            s.op("eq", (stopped, s.const(0, i32)), boolean)), boolean), (seen, stopped)
    seen, stopped = _spin(w, turn)
    stamp(w, 1)
    flag = lambda cond: w.op("select", (cond, w.const(1, i32), w.const(0, i32)), i32)  # noqa: E731
    w.op("store", (shared, w.const(0, i32), t))
    w.op("store", (shared, w.const(1, i32), flag(w.op("ne", (stopped, w.const(0, i32)), boolean))))
    w.op("store", (shared, w.const(2, i32), flag(w.op("eq", (seen, t), boolean))))
    return w


def _read_record(b: IRBuilder, ring, halt, shared, slots: int, slot, task, lid):
    """The first WIRE_WORDS work-items read the task's record, a word each, until every word
    carries the task's tag (one bus read for a published record; a leader's poll until it is
    published), then the first RECORD_WORDS rebuild the words from their halves. The tag is 1
    or 2 by the parity of the task's lap of the ring: a slot's last occupant (the task one lap
    earlier, or nothing) never has it. A word still stale when halt is set sets quit.
    docs/persistent.md: why tags and not a head word."""
    lap = b.op("and", (b.op("div", (task, b.const(slots, i32)), i32), b.const(1, i32)), i32)
    tag = b.op("bitcast", (b.op("add", (lap, b.const(1, i32)), i32),), u32, hint="tag")
    base = b.op("mul", (slot, b.const(WIRE_WORDS, i32)), i32, hint="base")
    rd = b.child()
    sixteen = rd.const(16, u32)
    tag_of = lambda into, wv: into.op("shr", (into.op("bitcast", (wv,), u32), sixteen), u32)  # noqa: E731

    def turn(s: IRBuilder):
        word = s.op("load", (ring, s.op("add", (base, lid), i32)), i32, (("volatile", 1),), hint="wire")
        stopped = s.op("load", (halt, s.const(0, i32)), i32, (("volatile", 1),), hint="halt")
        stale = s.op("ne", (tag_of(s, word), tag), boolean)
        return s.op("and", (stale, s.op("eq", (stopped, s.const(0, i32)), boolean)), boolean), (word,)
    word, = _spin(rd, turn)
    rd.op("store", (shared, rd.op("add", (lid, rd.const(3, i32)), i32),
                    rd.op("and", (word, rd.const(TAG_MASK, i32)), i32)))
    gave_up = rd.child()
    gave_up.op("atomic_max", (shared, gave_up.const(1, i32), gave_up.const(1, i32)), i32)
    rd.if_(rd.op("ne", (tag_of(rd, word), tag), boolean), gave_up)
    b.if_(b.op("lt", (lid, b.const(WIRE_WORDS, i32)), boolean), rd)
    b.op("barrier")
    join = b.child()
    two_lid = join.op("mul", (lid, join.const(2, i32)), i32)
    half = lambda k: join.op("bitcast", (join.op("load", (shared, join.op(  # noqa: E731
        "add", (two_lid, join.const(3 + k, i32)), i32)), i32),), u32)
    joined = join.op("or", (half(0), join.op("shl", (half(1), join.const(16, u32)), u32)), u32)
    join.op("store", (shared, join.op("add", (lid, join.const(REC, i32)), i32),
                      join.op("bitcast", (joined,), i32)))
    b.if_(b.op("lt", (lid, b.const(RECORD_WORDS, i32)), boolean), join)
    b.op("barrier")


def _dispatch_chain(b: IRBuilder, handlers, k, op_id, first, end, total, record):
    """if op == k: handler k over its groups; else the rest of the chain."""
    if k == len(handlers):
        return
    is_k = b.op("eq", (op_id, b.const(k, i32)), boolean)
    then = b.child()
    h = handlers[k]
    word = HEADER_WORDS
    for p in h.scalars:
        at = lambda n: then.const(REC + n, i32)   # noqa: E731
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

def _wire_forms(records: np.ndarray) -> np.ndarray:
    """Records (x RECORD_WORDS i32) as the ring holds them, in both tags (x 2 x WIRE_WORDS):
    wire word 2k holds word k's low 16 bits, 2k + 1 its high 16 bits, each under the tag."""
    halves = np.ascontiguousarray(records, np.int32).view(np.uint16).astype(np.uint32)
    return halves[:, None, :] | TAGS[None, :, None]


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
        self.done = runtime.mapped(ring_slots, np.int32)
        self.done_words = self.done.host
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
        spans = records[:, 1:HEADER_WORDS].tolist()
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
        recs[:, 4] = np.minimum(np.arange(len(recs), 0, -1), TAG_MASK)   # runs, as one batch
        return recs

    def encode_tasks(self, name: str, arg_rows, groups: int, split: int | None = None) -> np.ndarray:
        """Records for tasks, ready to publish (records x 2 x WIRE_WORDS): each in both of its
        wire forms, since a slot's tag alternates between its uses. submit_many publishes them
        at once; publish() takes records built once and published many times (what a serving
        loop that repeats the same tasks does; also what the dispatch benchmark times: the bus
        and the kernel, not Python's argument encoding)."""
        return _wire_forms(self._records(name, arg_rows, groups, split))

    def publish(self, records: np.ndarray) -> tuple[int, int]:
        """Publish records from encode_tasks(); returns the task range [first, end) for
        wait_range(). Each record goes into its slot tagged in every word (there is no head
        word: a record is published once all its words carry its tag), with its run: the
        records from it to its batch's end, so that the group that finds a batch's first
        record lets the holders of the rest go. Long publishes go in batches of up to 256."""
        if self.failed is not None:
            raise ConcordiaError(f"the persistent runtime has failed: {self.failed}")
        if records.ndim != 3 or records.shape[1:] != (2, WIRE_WORDS):
            raise ConcordiaError(f"publish() takes records from encode_tasks() (records x 2 x "
                                 f"{WIRE_WORDS}), got an array of shape {records.shape}")
        first, n = self.head, len(records)
        # the common case: one batch as encode_tasks made it (its runs right: the first record's
        # is n, the last one's 1; in lap 0's tag, 1 << 16 | run), its slots known free. Every
        # statement here is on the dispatch's critical path.
        if (n <= PUBLISH_BATCH and first + n - self.slots <= self.complete_below
                and records[0, 0, 8] == 0x10000 | n and (n == 1 or records[-1, 0, 8] == 0x10001)):
            if n == 1:
                self.wire[first % self.slots] = records[0, (first // self.slots) & 1]
            else:
                self._write_batch(first, records, runs_right=True)
            self.head = first + n
            return first, first + n
        batch = min(PUBLISH_BATCH, self.slots)
        for at in range(0, n, batch):
            chunk = records[at:at + batch]
            self._wait_slots(first + at, len(chunk))
            self._write_batch(first + at, chunk, runs_right=False)
            self.head = first + at + len(chunk)
        return first, first + n

    def _write_batch(self, seq0: int, rows: np.ndarray, runs_right: bool):
        """Rows for tasks seq0... into their slots, each in its lap's tag; the batch's first
        record last: on a host that keeps its stores in order, the group that finds it whole
        finds the others there too (the tags keep it right on any host)."""
        k, s0 = len(rows), seq0 % self.slots
        fit, lap = min(k, self.slots - s0), (seq0 // self.slots) & 1
        here, wrapped = rows[:fit, lap], rows[fit:, lap ^ 1]
        if not runs_right:
            here, wrapped = here.copy(), wrapped.copy()
            here[:, 8] = RUNS[-k:][:fit] | TAGS[lap]
            wrapped[:, 8] = RUNS[-k:][fit:] | TAGS[lap ^ 1]
        if fit < k:
            self.wire[:k - fit] = wrapped
        if fit > 1:
            self.wire[s0 + 1:s0 + fit] = here[1:]
        self.wire[s0] = here[0]

    def wait_range(self, first: int, end: int) -> None:
        """Until tasks [first, end) from publish() are complete (spins; watchdog applies)."""
        if end - first == 1:   # one record: spin on its word with no setup first
            done, slot = self.done_words, first % self.slots
            for _ in range(2000):
                if done[slot] > first:
                    if first <= self.complete_below:
                        self.complete_below = max(self.complete_below, end)
                    return
            self._wait_complete(first, end)   # a long wait: the spin with the watchdog
        elif end > first:
            s0, n = first % self.slots, end - first
            if s0 + n <= self.slots:   # one stretch of slots: its last word, then its minimum
                done, words = self.done_words, self.done_words[s0:s0 + n]
                for _ in range(2000):
                    if done[s0 + n - 1] >= end and words.min() > first:
                        if first <= self.complete_below:
                            self.complete_below = max(self.complete_below, end)
                        return
            self._wait_complete(first, end)

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
            done, slots = self.done_words, self.slots
            for seq in range(lo, end - 1):
                if done[seq % slots] <= seq:
                    self._spin_until_done(seq, t0)
        else:
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

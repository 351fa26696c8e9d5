"""The persistent kernel's dispatcher, written in IR: the loop every resident work-group runs.

A group claims a task index, waits for its turn or its record, runs the op table (an `if`
chain over the registered handlers, each inlined over the task's virtual groups) and marks the
task done. docs/persistent.md gives the protocol and its memory-ordering argument; the host
side (the ring, publishing, waiting, the watchdog) is handlers/persistent.py.

A record (RECORD_WORDS i32 words): op id, first group, group count, total groups of the task,
run (how many records from this one on were published together), then the handler's scalar
arguments (64-bit ones as two words, low first). In the ring each word travels as two wire
words, its 16-bit half under a 16-bit tag: 1 or 2 by the parity of the task's lap of the ring.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from concordia_ir.builder import IRBuilder, Names
from concordia_ir.errors import ConcordiaError, where
from concordia_ir.ops import Block, Kernel, Op, Value, walk
from concordia_ir.types import PtrType, boolean, i32, u32, u64
from concordia_ir.verifier import verify_kernel
from concordia.backends.runtime import DeviceBuffer, _as_kernel
from concordia.handlers.deferred_stores import deferrable, inline_deferred

RECORD_WORDS = 16    # a record: op id, first group, group count, total groups, run, arguments
WIRE_WORDS = 2 * RECORD_WORDS   # in the ring: each 16-bit half of a word beside a 16-bit tag
TAG_MASK = 0xFFFF
HEADER_WORDS = 5
TRACE_POINTS = 5     # per task, with trace=True: claimed, its turn, record in hand, ran, marked
ARG_WORDS = RECORD_WORDS - HEADER_WORDS
RUN_WORD = 4          # the record's word that holds its run; wire words 2 x RUN_WORD (+ 1)
# the dispatcher's local memory (i32 words): the claimed task, quit, whether this group leads,
# then the record's wire words as read (tags stripped), then its words
TASK, QUIT, LEADS, HALVES = 0, 1, 2, 3
REC = HALVES + WIRE_WORDS
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

def build_dispatcher(handlers: list[Handler], ring_slots: int, trace: bool = False,
                     defer: int = 1) -> Kernel:
    """The op table's resident loop. With `trace`, work-item 0 stamps each task's phases with
    the device clock (TRACE_POINTS per slot in `trace`: claimed, its turn, record in hand,
    handler done, completion marked); only targets with a device clock lower it. With `defer`
    > 1, a handler whose stores may wait runs that many virtual groups with their loads before
    their stores (handlers/deferred_stores.py)."""
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
    task = loop.op("load", (shared, loop.const(TASK, i32)), i32, hint="task")
    q = loop.op("load", (shared, loop.const(QUIT, i32)), i32, hint="quit")
    leads = loop.op("load", (shared, loop.const(LEADS, i32)), i32, hint="leads")

    run = loop.child()
    slot = run.op("rem", (task, run.const(ring_slots, i32)), i32, hint="slot")
    _read_record(run, ring, halt, shared, ring_slots, slot, task, lid)
    quit2 = run.op("load", (shared, run.const(QUIT, i32)), i32, hint="quit")
    # the leader lets the groups that claimed the records published with its own go
    tell = run.child()
    run_len = tell.op("load", (shared, tell.const(REC + RUN_WORD, i32)), i32, hint="run")
    tell.op("atomic_max", (claim, tell.const(1, i32), tell.op("add", (task, run_len), i32)), i32)
    ok = run.op("eq", (quit2, run.const(0, i32)), boolean)
    run.if_(run.op("and", (run.op("and", (is0, ok), boolean),
                           run.op("ne", (leads, run.const(0, i32)), boolean)), boolean), tell)
    go = run.child()
    def trace_out(into: IRBuilder, point: int, value: Value):   # into the slot's trace row
        at = into.op("mul", (slot, into.const(TRACE_POINTS, i32)), i32)
        into.op("store", (stamps_out, into.op("add", (at, into.const(point, i32)), i32), value))

    if trace:   # claimed, its turn, record in hand: out to the trace buffer
        tr = go.child()
        for k in range(2):
            trace_out(tr, k, tr.op("load", (stamps, tr.const(k, i32)), u64))
        trace_out(tr, 2, tr.op("clock", (), u64))
        go.if_(is0, tr)
    field_ = lambda n: go.op("load", (shared, go.const(REC + n, i32)), i32)  # noqa: E731
    op_id = field_(0)
    first, count, total = field_(1), field_(2), field_(3)
    end = go.op("add", (first, count), i32)
    _dispatch_chain(go, handlers, 0, op_id, first, end, total, shared, defer)
    go.op("barrier")
    fin = go.child()
    if trace:
        trace_out(fin, 3, fin.op("clock", (), u64))
    fin.op("fence")   # release: the task's results before its completion mark
    fin.op("store", (done, slot, fin.op("add", (task, fin.const(1, i32)), i32)))
    if trace:
        trace_out(fin, 4, fin.op("clock", (), u64))
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
    w.op("store", (shared, w.const(TASK, i32), t))
    w.op("store", (shared, w.const(QUIT, i32), flag(w.op("ne", (stopped, w.const(0, i32)), boolean))))
    w.op("store", (shared, w.const(LEADS, i32), flag(w.op("eq", (seen, t), boolean))))
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
    rd.op("store", (shared, rd.op("add", (lid, rd.const(HALVES, i32)), i32),
                    rd.op("and", (word, rd.const(TAG_MASK, i32)), i32)))
    gave_up = rd.child()
    gave_up.op("atomic_max", (shared, gave_up.const(QUIT, i32), gave_up.const(1, i32)), i32)
    rd.if_(rd.op("ne", (tag_of(rd, word), tag), boolean), gave_up)
    b.if_(b.op("lt", (lid, b.const(WIRE_WORDS, i32)), boolean), rd)
    b.op("barrier")
    join = b.child()
    two_lid = join.op("mul", (lid, join.const(2, i32)), i32)
    half = lambda k: join.op("bitcast", (join.op("load", (shared, join.op(  # noqa: E731
        "add", (two_lid, join.const(HALVES + k, i32)), i32)), i32),), u32)
    joined = join.op("or", (half(0), join.op("shl", (half(1), join.const(16, u32)), u32)), u32)
    join.op("store", (shared, join.op("add", (lid, join.const(REC, i32)), i32),
                      join.op("bitcast", (joined,), i32)))
    b.if_(b.op("lt", (lid, b.const(RECORD_WORDS, i32)), boolean), join)
    b.op("barrier")


def _dispatch_chain(b: IRBuilder, handlers, k, op_id, first, end, total, record, defer=1):
    """if op == k: handler k over its groups (`defer` at a time with their stores deferred,
    where handlers/deferred_stores.py may); else the rest of the chain."""
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
    if defer > 1 and deferrable(h.kernel, h.buffers):
        inline_deferred(then, _body_ops(h.kernel), f"h{k}.", first, end, defer,
                        lambda local, g: _inliner(h.kernel, f"h{k}.", g, total, local))
    else:
        g = Value(f"h{k}.cc.group", i32)
        body = then.child()
        _inline(body, h.kernel, f"h{k}.", g, total)
        then.emit("for", (first, end, then.const(1, i32)), regions=(body.region((g,)),))
    rest = b.child()
    _dispatch_chain(rest, handlers, k + 1, op_id, first, end, total, record, defer)
    b.if_(is_k, then, rest)


def _inliner(kernel: Kernel, prefix: str, g: Value, total: Value, local_prefix: str | None = None):
    """(rewrite(into, op), rv) for inlining the handler's ops as virtual group g: its
    parameters named `prefix` + name (the dispatcher's), its other values `local_prefix` +
    name (default `prefix`: one copy of the body), ids rebuilt from g."""
    params = {p.name for p in kernel.params}
    local_prefix = prefix if local_prefix is None else local_prefix

    def rv(v: Value) -> Value:
        return Value((prefix if v.name in params else local_prefix) + v.name, v.type)

    def block(into: IRBuilder, blk: Block) -> Block:
        inner = into.child()
        for op in blk.ops:
            rewrite(inner, op)
        return Block(tuple(rv(a) for a in blk.args), tuple(inner.ops))

    def rewrite(into: IRBuilder, op: Op):
        if op.name not in _IDS:
            into.ops.append(Op(op.name, tuple(rv(v) for v in op.operands),
                            tuple(rv(v) for v in op.results), op.attrs,
                            tuple(block(into, r) for r in op.regions), op.loc))
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

    return rewrite, rv


def _body_ops(kernel: Kernel) -> tuple:
    """A handler's ops without its final return (an op-table handler runs to its end)."""
    ops = kernel.body.ops
    return ops[:-1] if ops and ops[-1].name == "return" else ops


def _inline(b: IRBuilder, kernel: Kernel, prefix: str, g: Value, total: Value):
    """Appends the handler's body for virtual group g: values renamed, ids rebuilt from g."""
    rewrite, _ = _inliner(kernel, prefix, g, total)
    for op in _body_ops(kernel):
        rewrite(b, op)

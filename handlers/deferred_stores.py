"""A handler's virtual groups inlined U at a time, their stores deferred after all U bodies.

A record's virtual groups run one after another in one resident group. Inlined one at a time,
each group's load is issued only after the previous group's store: the compiler cannot prove
the handler's buffers apart, so it keeps program order, and a record costs one memory round
trip per virtual group (docs/persistent.md, session 10; `concordia bench dispatch_sass`).

Where a deferred store can meet no load, the stores can wait: each of U bodies runs with its
stores turned into values that its `if`s yield (a flag, an index, and what the stored value is
computed from), then the U bodies' stores run, in their program order, each after the ops that
compute its value (`sinkable`: left in the body, the first op on a loaded value would stall
the warp on its load before the next group's load). The loads of U groups then precede every
store and every use in program order, so a compiler issues them back to back with nothing
left to prove. A store can meet no
load when no buffer is both loaded and stored (by parameter, and by the memory bound to it), or
when every access of one that is sits at the work-item's own global id with its loads first
(bump); and every store runs at most once per group (none in a loop). Stores keep their order,
so a location written twice keeps the last write.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from concordia_ir.builder import IRBuilder
from concordia_ir.opdefs import OPS
from concordia_ir.ops import Block, Op, Value, walk
from concordia_ir.types import PtrType, boolean, i32

# ops after which a deferred store could be seen too late, or that order memory themselves
_ORDERING = ("barrier", "fence", "safepoint", "local_alloc")
MAX_DEFER = 16   # virtual groups a dispatcher may run with their stores deferred
# the default: on H100s, 4 took a 1 MiB task's device time from 5.1-5.5 to 3.9-4.6 us and
# its ring time from 0.55-1.02x a launch to 0.76-0.88x, over six runs each (8: 3.9 us and
# 0.68-1.01x over four; 16: 4.5 us). The benchmark's op table takes 40 registers a
# work-item at 1, 4 and 8, 64 at 16 (docs/persistent.md, session 11)
DEFAULT_DEFER = 4


def _root(buffer):
    """The allocation a buffer's memory belongs to (views and parts keep their whole alive),
    or None where it is wrapped memory that other wrapped buffers may overlap."""
    while not buffer.owned:
        whole = getattr(buffer, "_keepalive", None)
        if whole is None or not hasattr(whole, "owned"):
            return None
        buffer = whole
    return buffer


def deferrable(kernel, buffers) -> bool:
    """Whether the handler's stores may wait until U virtual groups have run (see above)."""
    ptrs = [p for p in kernel.params if isinstance(p.type, PtrType)]
    roots = {p.name: _root(b) for p, b in zip(ptrs, buffers)}
    accesses = []   # (ptr name, "load" | "store", index value name), in program order
    own_index = {op.result.name for op in walk(kernel.body)
                 if op.name == "global_id" and op.attr("dim") == 0}

    def visit(block: Block, in_loop: bool) -> bool:
        for op in block.ops:
            if op.name in _ORDERING or op.name.startswith("atomic"):
                return False
            if op.name == "store" and in_loop:
                return False
            if op.name in ("load", "store"):
                accesses.append((op.operands[0].name, op.name, op.operands[1].name))
            looped = in_loop or op.name in ("for", "while")
            if not all(visit(r, looped) for r in op.regions):
                return False
        return True

    if not visit(kernel.body, False):
        return False
    loaded = {a[0] for a in accesses if a[1] == "load"}
    stored = {a[0] for a in accesses if a[1] == "store"}
    if not stored or any(roots.get(n) is None for n in loaded | stored):
        return False   # wrapped memory, or a pointer that is not a parameter
    if not all(_own_elements(n, accesses, own_index) for n in loaded & stored):
        return False
    # a parameter both loaded and stored is checked above; two parameters on one memory never
    return not any(id(roots[a]) == id(roots[b]) for a in loaded for b in stored if a != b)


def _own_elements(ptr: str, accesses, own_index) -> bool:
    """A buffer both loaded and stored (bump's c[i] = c[i] + 1) may defer its stores when
    every access of it is at the work-item's own global id (one SSA value, so no two virtual
    groups touch one element) and its loads all come before its stores: a group's deferred
    store then meets no load of that element, its own or another group's."""
    mine = [(kind, index) for p, kind, index in accesses if p == ptr]
    if any(index not in own_index for _, index in mine) or len({i for _, i in mine}) != 1:
        return False
    kinds = [kind for kind, _ in mine]
    return "load" not in kinds[kinds.index("store"):]


def sinkable(body) -> frozenset:
    """Ops of a handler's body (by id) that its deferred stores compute instead, after every
    virtual group's loads: each a constant, or a pure op on a loaded value (through others of
    its kind), whose one use is a stored value or another such op. Left in the group's body,
    the first such op waits for its load before the next group's load is issued (ptxas keeps
    the branches of the inlined groups apart), so U groups would again cost U memory round
    trips (scale's a * x[i], bump's c[i] + 1; page_copy stores what it loaded and has none)."""
    ops = list(walk(Block((), tuple(body))))
    uses: dict[str, list] = {}
    for op in ops:
        for k, v in enumerate(op.operands):
            uses.setdefault(v.name, []).append((op, k))
    tainted: set[str] = set()
    for op in ops:
        # an if's or loop's results may carry loaded values: counted as loaded
        if op.name == "load" or op.regions or (
                _pure(op) and any(v.name in tainted for v in op.operands)):
            tainted.update(r.name for r in op.results)
    sunk: set[int] = set()
    for op in reversed(ops):   # a use comes after its definition: decided before it
        if not (_pure(op) and (op.name == "const" or op.result.name in tainted)):
            continue
        mine = uses.get(op.result.name, [])
        if len(mine) == 1 and ((mine[0][0].name == "store" and mine[0][1] == 2)
                               or id(mine[0][0]) in sunk):
            sunk.add(id(op))
    return frozenset(sunk)


def _pure(op: Op) -> bool:
    return len(op.results) == 1 and not op.regions and (
        OPS[op.name].pure or op.name in ("cast", "bitcast", "const"))


@dataclass(frozen=True)
class _Store:
    """A deferred store: where (ptr, idx), whether (flag; None: always, at this level), and
    what: the values it needs from its group's body (`leaves`, as that body named them in
    `names`), and the sunk ops that compute the stored value (`value`) from them."""
    ptr: Value
    flag: Value | None
    idx: Value
    leaves: tuple
    names: tuple
    ops: tuple
    value: Value

    def emit(self, into: IRBuilder) -> None:
        """The sunk ops, then the store, reading the leaves from where they are now."""
        now = {n: v for n, v in zip(self.names, self.leaves)}
        for op in self.ops:
            into.ops.append(Op(op.name, tuple(now.get(v.name, v) for v in op.operands),
                               op.results, op.attrs, (), op.loc))
        into.op("store", (self.ptr, self.idx, now.get(self.value.name, self.value)))


class _Deferral:
    """Rewrites one virtual group's body with its stores collected as `_Store`s and the ops
    in `sunk` left for them; `plain(into, op)` rewrites any other op, `rv` renames a value
    (the dispatcher's inliner for that group), `inner` names the body's own values (those
    a store must be handed out of the group's ifs; the rest, its parameters, are in scope)."""

    def __init__(self, plain, rv, sunk: frozenset, inner: frozenset):
        self.plain, self.rv, self.sunk, self.inner = plain, rv, sunk, inner
        self.recipes: dict[str, Op] = {}   # renamed result -> renamed sunk op

    def block(self, into: IRBuilder, ops) -> tuple[list, tuple]:
        """Rewrite `ops` into `into` up to a final yield (not emitted): the stores it made
        and the final yield's renamed values."""
        stores, ends = [], ()
        for op in ops:
            if op.name == "yield":
                ends = tuple(self.rv(v) for v in op.operands)
            elif id(op) in self.sunk:
                self.recipes[self.rv(op.result).name] = Op(
                    op.name, tuple(self.rv(v) for v in op.operands), (self.rv(op.result),),
                    op.attrs, (), op.loc)
            elif op.name == "store":
                stores.append(self.store(*op.operands))
            elif op.name == "if" and any(o.name == "store" for o in walk(Block((), (op,)))):
                stores += self.if_(into, op)
            else:
                self.plain(into, op)
        return stores, ends

    def store(self, ptr: Value, idx: Value, val: Value) -> _Store:
        """A store of this group: its value's sunk ops (defined before their uses) and the
        body's values they read."""
        ops, leaves = [], {}

        def visit(v: Value):
            op = self.recipes.get(v.name)
            if op is None:
                if v.name in self.inner:
                    leaves.setdefault(v.name, v)
                return
            for o in op.operands:
                visit(o)
            ops.append(op)
        value = self.rv(val)
        visit(value)
        names = tuple(leaves)
        return _Store(self.rv(ptr), None, self.rv(idx), tuple(leaves.values()), names,
                      tuple(ops), value)

    def if_(self, into: IRBuilder, op: Op, cond: Value | None = None) -> list:
        """The if, with a flag, an index and the leaves more among its results per store of
        either branch (the other branch yields a cleared flag and zeros); `cond`: its
        condition where that is already the caller's value."""
        branches = []
        for region in op.regions:
            b = into.child(op.loc)
            branches.append((b, *self.block(b, region.ops)))
        every = [s for _, st, _ in branches for s in st]
        for b, mine, ends in branches:
            extra = []
            for s in every:
                here = any(s is m for m in mine)
                extra.append((s.flag or b.const(1, i32)) if here else b.const(0, i32))
                extra += [v if here else b.const(0, v.type) for v in (s.idx, *s.leaves)]
            b.yield_(*ends, *extra)
        names = into.names
        out = [replace(s, flag=names.value("stored", i32), idx=names.value("at", s.idx.type),
                       leaves=tuple(names.value("value", v.type) for v in s.leaves))
               for s in every]
        results = tuple(self.rv(v) for v in op.results) + tuple(
            v for s in out for v in (s.flag, s.idx, *s.leaves))
        into.emit("if", (cond if cond is not None else self.rv(op.operands[0]),), results, op.attrs,
                  tuple(b.region() for b, _, _ in branches))
        return out


def inline_deferred(then: IRBuilder, body: tuple, prefix: str, first: Value, end: Value,
                    unroll: int, inliner) -> None:
    """for g0 in [first, end) by `unroll`: the bodies of groups g0 .. g0 + unroll - 1 (each
    guarded by g < end), their stores collected, then those stores in program order, each
    with the ops `sinkable` leaves it. `body`: the handler's ops; `inliner(prefix, g) ->
    (rewrite, rv)` is the dispatcher's inliner for group value `g`."""
    g0 = Value(f"{prefix}cc.group0", i32)
    loop = then.child()
    sunk = sinkable(body)
    ops = list(walk(Block((), tuple(body))))
    # the body's own values (a store hands them out of its group's ifs; parameters are in scope)
    defined = [v for op in ops for v in op.results] + [
        a for op in ops for reg in op.regions for a in reg.args]
    pending = []
    for u in range(unroll):
        g = loop.op("add", (g0, loop.const(u, i32)), i32, hint="group")
        inside = loop.op("lt", (g, end), boolean, hint="inside")
        guard = Op("if", (inside,), (), (), (Block((), tuple(body)), Block((), (Op("yield"),))))
        plain, rv = inliner(f"{prefix}u{u}.", g)
        inner = frozenset(rv(v).name for v in defined)
        pending += _Deferral(plain, rv, sunk, inner).if_(loop, guard, cond=inside)
    for s in pending:
        act = loop.child()
        s.emit(act)
        loop.if_(loop.op("ne", (s.flag, loop.const(0, i32)), boolean), act)
    then.emit("for", (first, end, then.const(unroll, i32)), regions=(loop.region((g0,)),))

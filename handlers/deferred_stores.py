"""A handler's virtual groups inlined U at a time, their stores deferred after all U bodies.

A record's virtual groups run one after another in one resident group. Inlined one at a time,
each group's load is issued only after the previous group's store: the compiler cannot prove
the handler's buffers apart, so it keeps program order, and a record costs one memory round
trip per virtual group (docs/persistent.md, session 10; `concordia bench dispatch_sass`).

Where a deferred store can meet no load, the stores can wait: each of U bodies runs with its
stores turned into values that its `if`s yield (a flag, an index, a value), then the U bodies'
stores run, in their program order. The loads of U groups then precede every store in program
order, so a compiler issues them back to back with nothing left to prove. A store can meet no
load when no buffer is both loaded and stored (by parameter, and by the memory bound to it), or
when every access of one that is sits at the work-item's own global id with its loads first
(bump); and every store runs at most once per group (none in a loop). Stores keep their order,
so a location written twice keeps the last write.
"""
from __future__ import annotations

from concordia_ir.builder import IRBuilder
from concordia_ir.ops import Block, Op, Value, walk
from concordia_ir.types import PtrType, boolean, i32

# ops after which a deferred store could be seen too late, or that order memory themselves
_ORDERING = ("barrier", "fence", "safepoint", "local_alloc")
MAX_DEFER = 16   # virtual groups a dispatcher may run with their stores deferred


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


class _Deferral:
    """Rewrites one virtual group's body with its stores collected as (ptr, flag, index,
    value); `plain(into, op)` rewrites any other op, `rv` renames a value (the dispatcher's
    inliner for that group)."""

    def __init__(self, plain, rv):
        self.plain, self.rv = plain, rv

    def block(self, into: IRBuilder, ops) -> tuple[list, tuple]:
        """Rewrite `ops` into `into` up to a final yield (not emitted): the stores it made
        (flag None: always, at this level) and the final yield's renamed values."""
        stores, ends = [], ()
        for op in ops:
            if op.name == "yield":
                ends = tuple(self.rv(v) for v in op.operands)
            elif op.name == "store":
                ptr, idx, val = op.operands
                stores.append((self.rv(ptr), None, self.rv(idx), self.rv(val)))
            elif op.name == "if" and any(o.name == "store" for o in walk(Block((), (op,)))):
                stores += self.if_(into, op)
            else:
                self.plain(into, op)
        return stores, ends

    def if_(self, into: IRBuilder, op: Op, cond: Value | None = None) -> list:
        """The if, with a flag, an index and a value more among its results per store of
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
                flag = (s[1] or b.const(1, i32)) if here else b.const(0, i32)
                extra += [flag, s[2] if here else b.const(0, s[2].type),
                          s[3] if here else b.const(0, s[3].type)]
            b.yield_(*ends, *extra)
        names = into.names
        out = []
        for ptr, _, idx, val in every:
            out.append((ptr, names.value("stored", i32), names.value("at", idx.type),
                        names.value("value", val.type)))
        results = tuple(self.rv(v) for v in op.results) + tuple(
            v for s in out for v in s[1:])
        into.emit("if", (cond if cond is not None else self.rv(op.operands[0]),), results, op.attrs,
                  tuple(b.region() for b, _, _ in branches))
        return out


def inline_deferred(then: IRBuilder, body: tuple, prefix: str, first: Value, end: Value,
                    unroll: int, inliner) -> None:
    """for g0 in [first, end) by `unroll`: the bodies of groups g0 .. g0 + unroll - 1 (each
    guarded by g < end), their stores collected, then those stores in program order. `body`:
    the handler's ops; `inliner(prefix, g) -> (rewrite, rv)` is the dispatcher's inliner for
    group value `g`."""
    g0 = Value(f"{prefix}cc.group0", i32)
    loop = then.child()
    pending = []
    for u in range(unroll):
        g = loop.op("add", (g0, loop.const(u, i32)), i32, hint="group")
        inside = loop.op("lt", (g, end), boolean, hint="inside")
        guard = Op("if", (inside,), (), (), (Block((), tuple(body)), Block((), (Op("yield"),))))
        pending += _Deferral(*inliner(f"{prefix}u{u}.", g)).if_(loop, guard, cond=inside)
    for ptr, flag, idx, val in pending:
        act = loop.child()
        act.op("store", (ptr, idx, val))
        loop.if_(loop.op("ne", (flag, loop.const(0, i32)), boolean), act)
    then.emit("for", (first, end, then.const(unroll, i32)), regions=(loop.region((g0,)),))

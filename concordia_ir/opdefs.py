"""Every op of the IR, declared once (after xDSL's irdl): its name, operand and result counts,
the scalar kinds its operands may have, its result rule, its attributes and its own `verify`.

The verifier, the parser, the uniformity analysis, the interpreter, the front-end and the
renderers all read these declarations; adding an op means a declaration here, its semantics
in the interpreter and a spelling in each renderer's table (tests/test_opdefs.py checks
that nothing is missing). A `verify` hook receives the verifier's checker `c`, which offers
`c.fail(op, msg)`, `c.result_is(op, t)`, `c.block(...)`, `c.divergent` and `c.nonuniform`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .ops import Op
from .types import PtrType, ScalarType, boolean, i32, u32, u64

NUMERIC = ("int", "uint", "float")
INTEGER = ("int", "uint")
LOGICAL = ("int", "uint", "bool")


@dataclass(frozen=True)
class OpDef:
    name: str
    group: str                        # typing family: see GROUPS
    operands: int | None = None       # fixed operand count; None: the op's verify checks it
    results: int | None = None
    kinds: tuple[str, ...] = ()       # scalar kinds the operands (all of one type) may have
    result: str = ""                  # "same": the operands' type; "bool"; "i32"; "": verify
    attrs: tuple[str, ...] = ()       # attributes that must be present
    pointers: bool = False            # takes pointer operands (memory ops)
    varying: bool = False             # differs between work-items even on uniform operands
    verify: Callable | None = None    # extra rule: verify(checker, op)
    doc: str = ""

    @property
    def pure(self) -> bool:
        """Computed from its operands alone: the interpreter's elementwise table covers it."""
        return self.group in ("binary", "unary", "compare") or self.name in ("fma", "select")


# ---- verify hooks for ops whose rule is more than counts and kinds ----------------------------

def _select(c, op: Op):
    t = [v.type for v in op.operands]
    if t[0] != boolean:
        c.fail(op, "condition must be bool")
    if t[1] != t[2]:
        c.fail(op, f"branches differ in type ({t[1]}, {t[2]})")
    c.result_is(op, t[1])


def _cast(c, op: Op):
    src, dst = op.operands[0].type, op.results[0].type
    if not isinstance(dst, ScalarType) or not isinstance(src, ScalarType):
        c.fail(op, "casts take and produce scalars")
    if op.name == "bitcast" and (src.bits != dst.bits or boolean in (src, dst)):
        c.fail(op, f"bitcast needs two non-bool types of one size, got {src} -> {dst}")


def _const(c, op: Op):
    t = op.results[0].type
    if not isinstance(t, ScalarType):
        c.fail(op, "constants are scalars")
    key = "bits" if t.is_float else "value"
    v = op.attr(key)
    lo, hi = (0, (1 << t.bits) - 1) if t.is_float else (t.min, t.max)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        c.fail(op, f"{key} {v!r} does not fit in {t}")


def _builtin(c, op: Op):
    if op.attr("dim") not in (0, 1, 2):
        c.fail(op, f"dim must be 0, 1 or 2, got {op.attr('dim')!r}")


def _clock(c, op: Op):
    c.result_is(op, u64)


def _memory(c, op: Op):
    t_in = [v.type for v in op.operands]
    ptr, idx = t_in[0], t_in[1]
    if not isinstance(ptr, PtrType):
        c.fail(op, f"first operand must be a pointer, got {ptr}")
    if not (isinstance(idx, ScalarType) and idx.is_int):
        c.fail(op, f"index must be an integer, got {idx}")
    for t in t_in[2:]:
        if t != ptr.elem:
            c.fail(op, f"value of type {t} stored through a {ptr}")
    if op.name.startswith("atomic_") and ptr.elem not in (i32, u32):
        c.fail(op, f"atomics are defined on i32 and u32, not {ptr.elem}")
    if op.results:
        c.result_is(op, ptr.elem)


def _local_alloc(c, op: Op):
    size = op.attr("size")
    if not isinstance(size, int) or size <= 0:
        c.fail(op, f"size must be a positive integer, got {size!r}")
    out = op.results[0].type
    if not isinstance(out, PtrType) or out.space != "local":
        c.fail(op, "result must be a ptr<local T>")


def _barrier(c, op: Op):
    if c.divergent:
        c.fail(op, "barrier inside divergent control flow (an if or loop whose condition "
                   "differs between work-items of a group)")
    if c.returned_divergently:
        c.fail(op, "barrier after some work-items of the group may have returned")


def _safepoint(c, op: Op):
    if not isinstance(op.attr("id"), int):
        c.fail(op, "safepoint needs an integer id attribute")


def _if(c, op: Op):
    if op.operands[0].type != boolean:
        c.fail(op, "condition must be bool")
    if len(op.regions) != 2 or any(r.args for r in op.regions):
        c.fail(op, "needs a then and an else region without arguments")
    div = c.divergent or op.operands[0].name in c.nonuniform
    for r in op.regions:
        c.block(r, div, "if", _types(op.results))


def _for(c, op: Op):
    if len(op.operands) < 3 or len(op.regions) != 1:
        c.fail(op, "takes lower, upper, step, then the initial carried values, and one body region")
    lo, hi, st = (v.type for v in op.operands[:3])
    if not (isinstance(lo, ScalarType) and lo.is_int and lo == hi == st):
        c.fail(op, f"bounds and step must share one integer type, got {lo}, {hi}, {st}")
    carried = _types(op.operands[3:])
    body = op.regions[0]
    if _types(body.args) != (lo,) + carried:
        c.fail(op, "body arguments must be the induction variable and the carried values")
    if _types(op.results) != carried:
        c.fail(op, "results must have the types of the carried values")
    div = c.divergent or any(v.name in c.nonuniform for v in op.operands[:3])
    c.block(body, div, "for", carried, first_may_safepoint=True)


def _while(c, op: Op):
    if len(op.regions) != 2:
        c.fail(op, "needs a before (condition) and an after (body) region")
    before, after = op.regions
    carried, res = _types(op.operands), _types(op.results)
    if _types(before.args) != carried:
        c.fail(op, "before-region arguments must match the initial values")
    if _types(after.args) != res:
        c.fail(op, "after-region arguments must match the results")
    cond = before.ops[-1] if before.ops else None
    div = c.divergent or (cond is not None and cond.name == "condition" and cond.operands
                          and cond.operands[0].name in c.nonuniform)
    c.block(before, div, "before", res)
    c.block(after, div, "after", carried, first_may_safepoint=True)


def _types(values) -> tuple:
    return tuple(v.type for v in values)


# ---- the declarations -------------------------------------------------------------------------

def _binary(name, kinds, doc):
    return OpDef(name, "binary", 2, 1, kinds, "same", doc=doc)


def _unary(name, kinds, doc):
    return OpDef(name, "unary", 1, 1, kinds, "same", doc=doc)


def _compare(name, kinds, doc):
    return OpDef(name, "compare", 2, 1, kinds, "bool", doc=doc)


def _id(name, doc, varying=False):
    return OpDef(name, "builtin", 0, 1, (), "i32", ("dim",), varying=varying, verify=_builtin, doc=doc)


def _atomic(name, n, doc):
    return OpDef(name, "atomic", n, 1, pointers=True, varying=True, verify=_memory, doc=doc)


DECLARATIONS = (
    _binary("add", NUMERIC, "a + b (integers wrap)"),
    _binary("sub", NUMERIC, "a - b (integers wrap)"),
    _binary("mul", NUMERIC, "a * b (integers wrap)"),
    _binary("div", NUMERIC, "a / b; integers truncate, x/0 = all ones, MIN/-1 = MIN"),
    _binary("rem", NUMERIC, "remainder with the dividend's sign; x%0 = x"),
    _binary("min", NUMERIC, "smaller operand; NaN loses to a number"),
    _binary("max", NUMERIC, "larger operand; NaN loses to a number"),
    _binary("and", LOGICAL, "bitwise and"),
    _binary("or", LOGICAL, "bitwise or"),
    _binary("xor", LOGICAL, "bitwise xor"),
    _binary("shl", INTEGER, "a << (b mod bits)"),
    _binary("shr", INTEGER, "a >> (b mod bits), arithmetic for signed types"),
    _unary("neg", NUMERIC, "-a (integers wrap)"),
    _unary("not", LOGICAL, "bitwise not"),
    _unary("abs", NUMERIC, "|a|; abs(MIN) = MIN"),
    _unary("sqrt", ("float",), "correctly rounded square root"),
    _unary("floor", ("float",), "round toward -inf"),
    _unary("ceil", ("float",), "round toward +inf"),
    _unary("popcount", INTEGER, "number of set bits"),
    _unary("clz", INTEGER, "leading zero bits; clz(0) = the type's width"),
    _compare("eq", NUMERIC + ("bool",), "a == b"),
    _compare("ne", NUMERIC + ("bool",), "a != b"),
    _compare("lt", NUMERIC, "a < b"),
    _compare("le", NUMERIC, "a <= b"),
    _compare("gt", NUMERIC, "a > b"),
    _compare("ge", NUMERIC, "a >= b"),
    OpDef("fma", "other", 3, 1, ("float",), "same", doc="a*b+c rounded once"),
    OpDef("select", "other", 3, 1, verify=_select, doc="b where a else c, both evaluated"),
    OpDef("cast", "other", 1, 1, verify=_cast, doc="value conversion; float->int saturates"),
    OpDef("bitcast", "other", 1, 1, verify=_cast, doc="reinterpret the bits"),
    OpDef("const", "other", 0, 1, verify=_const, doc="a literal: `value`, or `bits` for floats"),
    _id("global_id", "index in the grid", varying=True),
    _id("local_id", "index in the work-group", varying=True),
    _id("group_id", "the work-group's index"),
    _id("global_size", "work-items in the grid"),
    _id("local_size", "work-items in a group"),
    _id("num_groups", "work-groups in the grid"),
    OpDef("clock", "timer", 0, 1, varying=True, verify=_clock,
          doc="a device timestamp in ns (u64), for measuring only: never part of a result"),
    OpDef("load", "memory", 2, 1, pointers=True, verify=_memory, doc="ptr[index]"),
    OpDef("store", "memory", 3, 0, pointers=True, verify=_memory, doc="ptr[index] = value"),
    _atomic("atomic_add", 3, "ptr[i] += v; the old value"),
    _atomic("atomic_min", 3, "ptr[i] = min(ptr[i], v); the old value"),
    _atomic("atomic_max", 3, "ptr[i] = max(ptr[i], v); the old value"),
    _atomic("atomic_xchg", 3, "ptr[i] = v; the old value"),
    _atomic("atomic_cas", 4, "if ptr[i] == cmp: ptr[i] = new; the old value"),
    OpDef("local_alloc", "memory", 0, 1, attrs=("size",), verify=_local_alloc,
          doc="work-group local array"),
    OpDef("barrier", "sync", 0, 0, verify=_barrier, doc="the work-group waits; memory synced"),
    OpDef("fence", "sync", 0, 0, doc="earlier accesses seen by every observer before later ones"),
    OpDef("safepoint", "sync", 0, 0, attrs=("id",), verify=_safepoint,
          doc="a point where the kernel may pause (first op of a loop body)"),
    OpDef("if", "control", 1, None, verify=_if, doc="then / else regions"),
    OpDef("for", "control", None, None, verify=_for, doc="counted loop with carried values"),
    OpDef("while", "control", None, None, verify=_while, doc="before / after regions"),
    OpDef("yield", "terminator", None, 0, doc="ends an if, for or after region"),
    OpDef("condition", "terminator", None, 0, doc="ends a while's before region"),
    OpDef("return", "terminator", 0, 0, doc="the work-item ends"),
)
OPS: dict[str, OpDef] = {d.name: d for d in DECLARATIONS}
GROUPS = tuple(dict.fromkeys(d.group for d in DECLARATIONS))


def names(group: str, kinds_include: str | None = None) -> tuple[str, ...]:
    """Names of the ops of a group (optionally: those defined on a scalar kind)."""
    return tuple(d.name for d in DECLARATIONS if d.group == group
                 and (kinds_include is None or kinds_include in d.kinds))


ALL_OPS = frozenset(OPS)
COMPARE = names("compare")
BUILTINS = names("builtin")
ATOMICS = names("atomic")
TERMINATORS = names("terminator")

"""Building IR in code: one fresh-name generator and one builder, shared by the front-end, the
safepoint and store-tracking passes, the persistent dispatcher and the conformance cases.

    b = IRBuilder(Names(taken=kernel_names, prefix="cc."), loc)
    i = b.op("global_id", (), i32, (("dim", 0),), hint="i")
    then = b.child()
    then.op("store", (out, i, then.const(1, i32)))
    b.if_(b.op("lt", (i, n), boolean), then)
"""
from __future__ import annotations

from .ops import Block, Kernel, Loc, Op, Value
from .printer import float_to_bits
from .types import ScalarType, Type, i64


class Names:
    """Fresh SSA names: `hint` (after the prefix), then `hint.1`, `hint.2`, ...; without a hint
    0, 1, 2, ... Never a name in `taken`, so a pass cannot shadow a value of the kernel."""

    def __init__(self, taken=(), prefix: str = ""):
        self.taken = set(taken)
        self.prefix = prefix
        self.counter = 0

    @classmethod
    def of(cls, kernel: Kernel, prefix: str = "") -> "Names":
        """Fresh names for a pass over `kernel`: none of its parameters, results or region
        arguments is ever reused."""
        taken = {p.name for p in kernel.params}
        for op in kernel.walk():
            taken.update(v.name for v in op.results)
            taken.update(a.name for r in op.regions for a in r.args)
        return cls(taken, prefix)

    def fresh(self, hint: str | None = None) -> str:
        if hint:
            base = self.prefix + hint
            name, n = base, 1
            while name in self.taken:
                name, n = f"{base}.{n}", n + 1
        else:
            while self.prefix + str(self.counter) in self.taken:
                self.counter += 1
            name = self.prefix + str(self.counter)
        self.taken.add(name)
        return name

    def release(self, name: str):
        """Give back a name that was never used (the front-end renames a temporary after the
        variable it is assigned to)."""
        self.taken.discard(name)

    def value(self, hint: str | None, t: Type) -> Value:
        return Value(self.fresh(hint), t)


class IRBuilder:
    """Appends ops to `ops` (a list it may share with its owner). Children share the names."""

    def __init__(self, names: Names | None = None, loc: Loc | None = None,
                 ops: list[Op] | None = None):
        self.names = names if names is not None else Names()
        self.loc = loc
        self.ops: list[Op] = ops if ops is not None else []

    def child(self, loc: Loc | None = None) -> "IRBuilder":
        """A builder for a region: same names, its own op list (and this builder's class)."""
        return type(self)(self.names, loc if loc is not None else self.loc)

    def emit(self, name: str, operands=(), results=(), attrs=(), regions=()) -> tuple[Value, ...]:
        """An op whose results are the given Values (when the caller chose their names)."""
        self.ops.append(Op(name, tuple(operands), tuple(results), tuple(attrs), tuple(regions),
                           self.loc))
        return tuple(results)

    def op(self, name: str, operands=(), t: Type | None = None, attrs=(), regions=(),
           hint: str | None = "v") -> Value | None:
        """An op with no result (t None) or one fresh result of type t."""
        results = (self.names.value(hint, t),) if t is not None else ()
        self.emit(name, operands, results, attrs, regions)
        return results[0] if results else None

    def const(self, value, t: ScalarType = i64, hint: str | None = "k") -> Value:
        if t.is_float:
            return self.op("const", (), t, (("bits", float_to_bits(float(value), t.bits)),), hint=hint)
        return self.op("const", (), t, (("value", int(value)),), hint=hint)

    # -- terminators and regions
    def yield_(self, *values: Value):
        self.emit("yield", values)

    def condition(self, cond: Value, *values: Value):
        self.emit("condition", (cond, *values))

    def return_(self, attrs=()):
        self.emit("return", attrs=attrs)

    def region(self, args=(), end: str | None = "yield") -> Block:
        """This builder's ops as a Block, closed with an empty `end` if not yet terminated."""
        ops = self.ops
        if end and (not ops or ops[-1].name not in ("yield", "condition", "return")):
            ops = ops + [Op(end, loc=self.loc)]
        return Block(tuple(args), tuple(ops))

    def if_(self, cond: Value, then: "IRBuilder", otherwise: "IRBuilder | None" = None,
            results=()) -> tuple[Value, ...]:
        """if cond: then's ops, else otherwise's (or nothing). Regions end in an empty yield
        unless they already end in a terminator."""
        other = otherwise.region() if otherwise is not None else Block((), (Op("yield", loc=self.loc),))
        return self.emit("if", (cond,), results, (), (then.region(), other))

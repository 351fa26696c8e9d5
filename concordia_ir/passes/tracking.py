"""Store tracking: an IR pass that makes every store (and atomic) to a tracked buffer also set
its page's dirty flag, so that a checkpoint costs O(dirty pages) instead of O(region size).

    tracked = instrument_stores(kernel, {"kv": 1024})   # param name -> elements per page
    # the kernel now takes one more parameter, `kv.dirty: ptr<global i32>`, per tracked buffer
"""
from __future__ import annotations

from concordia_ir.ops import ATOMICS, Block, Kernel, Op, Value
from concordia_ir.types import PtrType, i32, i64
from concordia_ir.verifier import verify_kernel


class _Instrumenter:
    def __init__(self, flags: dict[str, Value], elems_per_page: dict[str, int]):
        self.flags, self.epp = flags, elems_per_page
        self.n = 0

    def fresh(self, t) -> Value:
        self.n += 1
        return Value(f"trk.{self.n}", t)

    def block(self, b: Block) -> Block:
        ops = []
        for op in b.ops:
            if op.regions:
                op = Op(op.name, op.operands, op.results, op.attrs,
                        tuple(self.block(r) for r in op.regions), op.loc)
            ops.append(op)
            if (op.name == "store" or op.name in ATOMICS) and op.operands[0].name in self.flags:
                ops.extend(self.mark(op))
        return Block(b.args, tuple(ops))

    def mark(self, op: Op) -> list[Op]:
        """flags[idx / elems_per_page] = 1, with a shift when the page size allows (it usually does)."""
        ptr, idx = op.operands[0], op.operands[1]
        epp = self.epp[ptr.name]
        out = []
        if idx.type != i64:
            wide = self.fresh(i64)
            out.append(Op("cast", (idx,), (wide,), loc=op.loc))
            idx = wide
        k = self.fresh(i64)
        page64 = self.fresh(i64)
        if epp & (epp - 1) == 0:
            out += [Op("const", (), (k,), (("value", epp.bit_length() - 1),), loc=op.loc),
                    Op("shr", (idx, k), (page64,), loc=op.loc)]
        else:
            out += [Op("const", (), (k,), (("value", epp),), loc=op.loc),
                    Op("div", (idx, k), (page64,), loc=op.loc)]
        one = self.fresh(i32)
        out += [Op("const", (), (one,), (("value", 1),), loc=op.loc),
                Op("store", (self.flags[ptr.name], page64, one), loc=op.loc)]
        return out


def instrument_stores(kernel: Kernel, elems_per_page: dict[str, int]) -> Kernel:
    """A copy of `kernel` whose stores to the named pointer params also mark dirty pages."""
    params = {p.name: p for p in kernel.params}
    for name, epp in elems_per_page.items():
        if name not in params or not isinstance(params[name].type, PtrType):
            raise KeyError(f"kernel {kernel.name!r} has no pointer parameter {name!r}")
        if epp <= 0:
            raise ValueError("elements per page must be positive")
    flags = {n: Value(f"{n}.dirty", PtrType(i32)) for n in elems_per_page}
    body = _Instrumenter(flags, elems_per_page).block(kernel.body)
    out = Kernel(f"{kernel.name}_tracked", kernel.params + tuple(flags.values()), body, kernel.loc)
    return verify_kernel(out)

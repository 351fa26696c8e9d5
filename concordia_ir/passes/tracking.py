"""Store tracking: an IR pass that makes every store (and atomic) to a tracked buffer also set
its page's dirty flag, so that a checkpoint costs O(dirty pages) instead of O(region size).

    tracked = instrument_stores(kernel, {"kv": 1024})   # param name -> elements per page
    # the kernel now takes one more parameter, `kv.dirty: ptr<global i32>`, per tracked buffer
"""
from __future__ import annotations

from concordia_ir.builder import IRBuilder, Names
from concordia_ir.opdefs import ATOMICS
from concordia_ir.ops import Block, Kernel, Op, Value
from concordia_ir.types import PtrType, i32, i64
from concordia_ir.verifier import verify_kernel


class _Instrumenter:
    def __init__(self, flags: dict[str, Value], elems_per_page: dict[str, int], names: Names):
        self.flags, self.epp, self.names = flags, elems_per_page, names

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
        b = IRBuilder(self.names, op.loc)
        ptr, idx = op.operands[0], op.operands[1]
        epp = self.epp[ptr.name]
        if idx.type != i64:
            idx = b.op("cast", (idx,), i64, hint="trk")
        if epp & (epp - 1) == 0:
            page = b.op("shr", (idx, b.const(epp.bit_length() - 1, i64, hint="trk")), i64, hint="trk")
        else:
            page = b.op("div", (idx, b.const(epp, i64, hint="trk")), i64, hint="trk")
        b.op("store", (self.flags[ptr.name], page, b.const(1, i32, hint="trk")))
        return b.ops


def instrument_stores(kernel: Kernel, elems_per_page: dict[str, int]) -> Kernel:
    """A copy of `kernel` whose stores to the named pointer params also mark dirty pages."""
    params = {p.name: p for p in kernel.params}
    for name, epp in elems_per_page.items():
        if name not in params or not isinstance(params[name].type, PtrType):
            raise KeyError(f"kernel {kernel.name!r} has no pointer parameter {name!r}")
        if epp <= 0:
            raise ValueError("elements per page must be positive")
    flags = {n: Value(f"{n}.dirty", PtrType(i32)) for n in elems_per_page}
    body = _Instrumenter(flags, elems_per_page, Names.of(kernel)).block(kernel.body)
    out = Kernel(f"{kernel.name}_tracked", kernel.params + tuple(flags.values()), body, kernel.loc)
    return verify_kernel(out)

"""Verifier: typing and structural rules of the IR. Errors name file:line, kernel and op."""
from __future__ import annotations

from .errors import IRVerifyError, where
from .ops import (ARITH, ATOMICS, BITWISE, BUILTINS, COMPARE, FLOAT_ONLY_UNARY, SHIFT,
                  TERMINATORS, UNARY, Block, Kernel, Module, Op, Value)
from .types import PtrType, ScalarType, boolean, i32, u32
from .uniformity import nonuniform_values


class _KernelVerifier:
    def __init__(self, kernel: Kernel):
        self.k = kernel
        self.names: set[str] = set()
        self.nonuniform = nonuniform_values(kernel)
        self.returned_divergently = False

    def fail(self, op: Op | None, msg: str):
        node = op if op is not None else self.k
        # the file being checked first (IR text), the Python line it came from after it
        loc, origin = node.textloc or node.loc, node.loc if node.textloc else None
        what = f"op '{op.name}': " if op is not None else ""
        came = f" (from {origin.file}:{origin.line})" if origin is not None else ""
        raise IRVerifyError(f"{where(loc)}kernel '{self.k.name}': {what}{msg}{came}")

    def define(self, op: Op | None, v: Value, scope: set[str]):
        if v.name in self.names:
            self.fail(op, f"value %{v.name} is defined twice")
        self.names.add(v.name)
        scope.add(v.name)

    def run(self):
        scope: set[str] = set()
        for p in self.k.params:
            if isinstance(p.type, PtrType) and p.type.space != "global":
                self.fail(None, f"parameter %{p.name} is a {p.type}; kernel parameters may "
                                "only point to global memory (use local_alloc for local arrays)")
            self.define(None, p, scope)
        ops = self.k.body.ops
        if not ops or ops[-1].name != "return":
            last = ops[-1] if ops else None
            self.fail(last, "kernel body must end with 'return' (missing return)")
        self.block(self.k.body, scope, divergent=False, role="kernel")

    # role: what terminator the block needs ('kernel', 'if', 'for', 'before', 'after')
    def block(self, b: Block, outer: set[str], divergent: bool, role: str,
              yields: tuple = (), first_may_safepoint: bool = False):
        scope = set(outer)
        for a in b.args:
            if isinstance(a.type, PtrType):
                self.fail(None, f"region argument %{a.name} may not be a pointer")
            self.define(None, a, scope)
        for i, op in enumerate(b.ops):
            last = i == len(b.ops) - 1
            if op.name in TERMINATORS and not last:
                self.fail(op, "terminator is not the last op of its block")
            if op.name == "safepoint" and not (i == 0 and first_may_safepoint):
                self.fail(op, "a safepoint must be the first op of a loop body (a loop head)")
            if op.name == "local_alloc" and role != "kernel":
                self.fail(op, "local arrays must be allocated at the top level of the kernel")
            for v in op.operands:
                if v.name not in scope:
                    self.fail(op, f"use of undefined value %{v.name}")
            self.check_op(op, scope, divergent)
            for r in op.results:
                self.define(op, r, scope)
        term = b.ops[-1] if b.ops else None
        if term is None or term.name not in TERMINATORS:
            self.fail(term, f"block of '{role}' must end with a terminator (yield/condition/return)")
        if term.name == "return":
            if role != "kernel" and divergent:
                self.returned_divergently = True
            return
        want = {"kernel": "return", "if": "yield", "for": "yield", "after": "yield",
                "before": "condition"}[role]
        if term.name != want:
            self.fail(term, f"block of '{role}' must end with '{want}' or 'return'")
        vals = term.operands[1:] if want == "condition" else term.operands
        if want == "condition" and (not term.operands or term.operands[0].type != boolean):
            self.fail(term, "condition needs a bool first operand")
        if tuple(v.type for v in vals) != yields:
            self.fail(term, f"yields ({_types(vals)}) but the enclosing op expects "
                            f"({', '.join(map(str, yields))})")

    def check_op(self, op: Op, scope: set[str], divergent: bool):
        name, ins, outs = op.name, op.operands, op.results
        t_in = [v.type for v in ins]
        if name not in ("load", "store") + ATOMICS:
            for v in ins:
                if isinstance(v.type, PtrType):
                    self.fail(op, f"pointer %{v.name} can only be used by load/store/atomics")

        def arity(n_in, n_out):
            if len(ins) != n_in or len(outs) != n_out:
                self.fail(op, f"takes {n_in} operand(s) and {n_out} result(s), "
                              f"got {len(ins)} and {len(outs)}")

        def same(kinds: tuple[str, ...]):
            t = t_in[0]
            if any(x != t for x in t_in):
                self.fail(op, f"operand types differ ({_types(ins)}); casts are explicit")
            if not isinstance(t, ScalarType) or t.kind not in kinds:
                self.fail(op, f"not defined on {t}")
            return t

        if name in ARITH + BITWISE + SHIFT:
            arity(2, 1)
            kinds = {**{n: ("int", "uint", "float") for n in ARITH},
                     **{n: ("int", "uint", "bool") for n in BITWISE},
                     **{n: ("int", "uint") for n in SHIFT}}[name]
            self.result_is(op, same(kinds))
        elif name in UNARY:
            arity(1, 1)
            kinds = ("float",) if name in FLOAT_ONLY_UNARY else \
                ("int", "uint", "bool") if name == "not" else ("int", "uint", "float")
            self.result_is(op, same(kinds))
        elif name in COMPARE:
            arity(2, 1)
            same(("int", "uint", "float") + (("bool",) if name in ("eq", "ne") else ()))
            self.result_is(op, boolean)
        elif name == "fma":
            arity(3, 1)
            self.result_is(op, same(("float",)))
        elif name == "select":
            arity(3, 1)
            if t_in[0] != boolean:
                self.fail(op, "condition must be bool")
            if t_in[1] != t_in[2]:
                self.fail(op, f"branches differ in type ({t_in[1]}, {t_in[2]})")
            self.result_is(op, t_in[1])
        elif name in ("cast", "bitcast"):
            arity(1, 1)
            src, dst = t_in[0], outs[0].type
            if not isinstance(dst, ScalarType):
                self.fail(op, "casts produce scalars")
            if name == "bitcast" and (src.bits != dst.bits or boolean in (src, dst)):
                self.fail(op, f"bitcast needs two non-bool types of one size, got {src} -> {dst}")
        elif name == "const":
            arity(0, 1)
            self.check_const(op)
        elif name in BUILTINS:
            arity(0, 1)
            if op.attr("dim") not in (0, 1, 2):
                self.fail(op, f"dim must be 0, 1 or 2, got {op.attr('dim')!r}")
            self.result_is(op, i32)
        elif name in ("load", "store") + ATOMICS:
            self.check_memory(op, t_in)
        elif name == "local_alloc":
            arity(0, 1)
            size = op.attr("size")
            if not isinstance(size, int) or size <= 0:
                self.fail(op, f"size must be a positive integer, got {size!r}")
            if not isinstance(outs[0].type, PtrType) or outs[0].type.space != "local":
                self.fail(op, "result must be a ptr<local T>")
        elif name == "barrier":
            arity(0, 0)
            if divergent:
                self.fail(op, "barrier inside divergent control flow (an if or loop whose "
                              "condition differs between work-items of a group)")
            if self.returned_divergently:
                self.fail(op, "barrier after some work-items of the group may have returned")
        elif name == "fence":
            arity(0, 0)   # orders this work-item's memory accesses for every observer (host too)
        elif name == "safepoint":
            arity(0, 0)
            if not isinstance(op.attr("id"), int):
                self.fail(op, "safepoint needs an integer id attribute")
        elif name == "if":
            arity(1, len(outs))
            if t_in[0] != boolean:
                self.fail(op, "condition must be bool")
            if len(op.regions) != 2 or any(r.args for r in op.regions):
                self.fail(op, "needs a then and an else region without arguments")
            div = divergent or ins[0].name in self.nonuniform
            for r in op.regions:
                self.block(r, scope, div, "if", self.result_types(op))
        elif name == "for":
            if len(ins) < 3 or len(op.regions) != 1:
                self.fail(op, "takes lower, upper, step, then the initial carried values, "
                              "and one body region")
            lo, hi, st = t_in[:3]
            if not (isinstance(lo, ScalarType) and lo.is_int and lo == hi == st):
                self.fail(op, f"bounds and step must share one integer type, got {lo}, {hi}, {st}")
            carried = tuple(t_in[3:])
            body = op.regions[0]
            if tuple(a.type for a in body.args) != (lo,) + carried:
                self.fail(op, "body arguments must be the induction variable and the carried values")
            if self.result_types(op) != carried:
                self.fail(op, "results must have the types of the carried values")
            div = divergent or any(v.name in self.nonuniform for v in ins[:3])
            self.block(body, scope, div, "for", carried, first_may_safepoint=True)
        elif name == "while":
            if len(op.regions) != 2:
                self.fail(op, "needs a before (condition) and an after (body) region")
            before, after = op.regions
            carried, res = tuple(t_in), self.result_types(op)
            if tuple(a.type for a in before.args) != carried:
                self.fail(op, "before-region arguments must match the initial values")
            if tuple(a.type for a in after.args) != res:
                self.fail(op, "after-region arguments must match the results")
            cond = before.ops[-1] if before.ops else None
            div = divergent or (cond is not None and cond.name == "condition" and cond.operands
                                and cond.operands[0].name in self.nonuniform)
            self.block(before, scope, div, "before", res)
            self.block(after, scope, div, "after", carried, first_may_safepoint=True)
        elif name in TERMINATORS:
            if outs:
                self.fail(op, "terminators have no results")
        else:
            self.fail(op, "unknown op")

    def result_types(self, op: Op) -> tuple:
        return tuple(r.type for r in op.results)

    def result_is(self, op: Op, t):
        if op.results[0].type != t:
            self.fail(op, f"result type is {op.results[0].type}, expected {t}")

    def check_const(self, op: Op):
        t = op.results[0].type
        if not isinstance(t, ScalarType):
            self.fail(op, "constants are scalars")
        key = "bits" if t.is_float else "value"
        v = op.attr(key)
        lo, hi = (0, (1 << t.bits) - 1) if t.is_float else (t.min, t.max)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            self.fail(op, f"{key} {v!r} does not fit in {t}")

    def check_memory(self, op: Op, t_in: list):
        n_in = {"load": 2, "store": 3, "atomic_cas": 4}.get(op.name, 3)
        n_out = 0 if op.name == "store" else 1
        if len(t_in) != n_in or len(op.results) != n_out:
            self.fail(op, f"takes {n_in} operand(s) and {n_out} result(s)")
        ptr, idx = t_in[0], t_in[1]
        if not isinstance(ptr, PtrType):
            self.fail(op, f"first operand must be a pointer, got {ptr}")
        if not (isinstance(idx, ScalarType) and idx.is_int):
            self.fail(op, f"index must be an integer, got {idx}")
        for t in t_in[2:]:
            if t != ptr.elem:
                self.fail(op, f"value of type {t} stored through a {ptr}")
        if op.name in ATOMICS and ptr.elem not in (i32, u32):
            self.fail(op, f"atomics are defined on i32 and u32, not {ptr.elem}")
        if n_out:
            self.result_is(op, ptr.elem)


def _types(vals) -> str:
    return ", ".join(str(v.type) for v in vals)


def verify_kernel(kernel: Kernel) -> Kernel:
    _KernelVerifier(kernel).run()
    return kernel


def verify_module(module: Module) -> Module:
    seen = set()
    for k in module.kernels:
        if k.name in seen:
            raise IRVerifyError(f"{where(k.textloc or k.loc)}kernel '{k.name}' is defined twice")
        seen.add(k.name)
        verify_kernel(k)
    return module

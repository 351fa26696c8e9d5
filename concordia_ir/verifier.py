"""Verifier: typing and structural rules of the IR. Errors name file:line, kernel and op.

Block structure (scopes, terminators, safepoint placement) is checked here; what each op
requires comes from its declaration in opdefs.py."""
from __future__ import annotations

from .errors import IRVerifyError, where
from .opdefs import OPS, TERMINATORS
from .ops import Block, Kernel, Module, Op, Value
from .types import PtrType, ScalarType, boolean, i32
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
        self.check_block(self.k.body, scope, divergent=False, role="kernel")

    # role: what terminator the block needs ('kernel', 'if', 'for', 'before', 'after')
    def check_block(self, b: Block, outer: set[str], divergent: bool, role: str,
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
        """The generic rules every declaration states (counts, pointers, kinds, result), then
        the op's own `verify`."""
        d = OPS.get(op.name)
        if d is None:
            self.fail(op, "unknown op")
        ins, outs = op.operands, op.results
        if not d.pointers:
            for v in ins:
                if isinstance(v.type, PtrType):
                    self.fail(op, f"pointer %{v.name} can only be used by load/store/atomics")
        if (d.operands is not None and len(ins) != d.operands) or \
                (d.results is not None and len(outs) != d.results):
            n_in = d.operands if d.operands is not None else len(ins)
            n_out = d.results if d.results is not None else len(outs)
            self.fail(op, f"takes {n_in} operand(s) and {n_out} result(s), "
                          f"got {len(ins)} and {len(outs)}")
        if d.kinds:
            t = ins[0].type
            if any(v.type != t for v in ins):
                self.fail(op, f"operand types differ ({_types(ins)}); casts are explicit")
            if not isinstance(t, ScalarType) or t.kind not in d.kinds:
                self.fail(op, f"not defined on {t}")
        if d.result:
            self.result_is(op, {"same": ins[0].type if ins else None, "bool": boolean,
                                "i32": i32}[d.result])
        if d.verify is not None:
            self.scope, self.divergent = scope, divergent
            d.verify(self, op)

    def block(self, b: Block, divergent: bool, role: str, yields: tuple = (),
              first_may_safepoint: bool = False):
        """A region of the op being checked (called by control ops' verify)."""
        scope, outer_divergent = self.scope, self.divergent
        try:
            self.check_block(b, scope, divergent, role, yields, first_may_safepoint)
        finally:   # the region's own ops moved them
            self.scope, self.divergent = scope, outer_divergent

    def result_types(self, op: Op) -> tuple:
        return tuple(r.type for r in op.results)

    def result_is(self, op: Op, t):
        if op.results[0].type != t:
            self.fail(op, f"result type is {op.results[0].type}, expected {t}")


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

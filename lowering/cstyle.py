"""One C-family renderer for OpenCL C, CUDA C++ and HIP C++ (their differences: dialects.py).

Every SSA value becomes a named C local; region results become variables assigned by
`yield`. Integer arithmetic goes through the unsigned type so that wraparound is defined;
division, saturating casts and float min/max go through small helpers that spell out
docs/semantics.md. Python decides everything here; the templates only print.
"""
from __future__ import annotations

import math
import os
import re
from functools import lru_cache

import jinja2

from concordia_ir.errors import CompileError, where
from concordia_ir.opdefs import ATOMICS, BUILTINS, COMPARE
from concordia_ir.ops import Block, Kernel, Op, Value
from concordia_ir.printer import float_from_bits
from concordia_ir.types import PtrType, ScalarType, boolean, f32, i32, u32, u64

from .dialects import Dialect

_ENV = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"),
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)

_RESERVED = set("""auto break case char const continue default do double else enum extern float
for goto if inline int long register restrict return short signed sizeof static struct switch
typedef union unsigned void volatile while bool true false class template this new delete
operator private public namespace using kernel global local constant private half uchar ushort
uint ulong min max abs sqrt floor ceil fma fmod select barrier dot clamp mix sign exp log pow
threadIdx blockIdx blockDim gridDim warpSize""".split())

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "and": "&", "or": "|", "xor": "^",
          "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_UNSIGNED = {"i32": u32, "u32": u32, "i64": u64, "u64": u64}


class CStyleRenderer:
    def __init__(self, dialect: Dialect):
        self.d = dialect
        self.helpers_tpl = _helpers_module()

    # -- entry
    def render(self, kernel: Kernel) -> str:
        self.reset(kernel)
        params = [self.param(p) for p in kernel.params]
        prologue = [f"    const bool {self.cname(p)} = {self.cname(p)}_raw != 0;"
                    for p in kernel.params if p.type == boolean]
        self.lines.extend(prologue)
        self.block(kernel.body, 1, on_end=None)
        return self.finish(kernel, "kernel.c.j2", kernel_prefix=self.d.kernel_prefix,
                           params=params)

    def reset(self, kernel: Kernel):
        self.cnames: dict[str, str] = {}
        self.taken: set[str] = set()
        self.helpers: dict[str, str] = {}
        self.consts: dict[str, object] = {}
        self.spaces: dict[str, str] = {}
        self.lines: list[str] = []
        self.last_line = None
        self.uses_f64 = any(_mentions_f64(v.type) for v in kernel.params) or any(
            _mentions_f64(v.type) for op in kernel.walk() for v in op.results + op.operands)

    def finish(self, kernel: Kernel, template: str, **fields) -> str:
        src = kernel.loc.file if kernel.loc else None
        return _ENV.get_template(template).render(
            name=kernel.name, source=f"{os.path.basename(src)}:{kernel.loc.line}" if src else None,
            target=self.d.name,
            preamble=self.d.preamble + (self.d.fp64_preamble if self.uses_f64 else ())
            + (self.d.clock_preamble if any(op.name == "clock" for op in kernel.walk()) else ()),
            helpers=list(self.helpers.values()), body=self.lines, **fields)

    # -- names and types
    def cname(self, v: Value) -> str:
        if v.name not in self.cnames:
            base = f"t{v.name}" if v.name[0].isdigit() else re.sub(r"\W", "_", v.name)
            if base in _RESERVED or base.startswith("cc_"):   # cc_ is the helpers' prefix
                base = "v_" + base
            name, k = base, 1
            while name in self.taken:
                name, k = f"{base}_{k}", k + 1
            self.taken.add(name)
            self.cnames[v.name] = name
        return self.cnames[v.name]

    def fresh(self, hint: str) -> str:
        return self.cname(Value(f"{hint}.{len(self.cnames)}", i32))

    def ctype(self, t: ScalarType) -> str:
        return self.d.types[t.name]

    def storage(self, t: ScalarType) -> str:
        return self.d.bool_storage if t == boolean else self.ctype(t)

    def param(self, p: Value) -> str:
        if isinstance(p.type, PtrType):
            self.spaces[p.name] = "global"
            return f"{self.d.global_ptr}{self.storage(p.type.elem)}* {self.cname(p)}"
        if p.type == boolean:
            return f"{self.d.bool_storage} {self.cname(p)}_raw"
        return f"{self.ctype(p.type)} {self.cname(p)}"

    # -- statements
    def emit(self, indent: int, text: str, op: Op | None = None):
        if op is not None and op.loc is not None and op.loc.line != self.last_line:
            self.last_line = op.loc.line
            self.lines.append("    " * indent + f"// {os.path.basename(op.loc.file)}:{op.loc.line}")
        self.lines.append("    " * indent + text)

    def define(self, indent: int, op: Op, expr: str):
        r = op.results[0]
        self.emit(indent, self.declare(r, expr, const=True), op)

    def declare(self, v: Value, init: str | None = None, const: bool = False) -> str:
        """A C declaration of an SSA value (a subclass may keep values elsewhere)."""
        head = f"{'const ' if const else ''}{self.ctype(v.type)} {self.cname(v)}"
        return f"{head} = {init};" if init is not None else f"{head};"

    def block(self, b: Block, indent: int, on_end):
        """Render a block; `on_end(values, indent)` renders its yield/condition terminator."""
        for op in b.ops:
            if op.name in ("yield", "condition"):
                on_end([self.cname(v) for v in op.operands], indent, op)
                return
            if op.name == "return":
                self.emit(indent, self.return_stmt(), op)
                return
            getattr(self, "op_" + op.name, self.op_value)(op, indent)

    def return_stmt(self) -> str:
        return "return;"

    def assign_all(self, targets: list[str], values: list[str], types, indent: int, op):
        """Parallel assignment (a yield may swap carried values): through temporaries."""
        if len(targets) == 1:
            if targets[0] != values[0]:
                self.emit(indent, f"{targets[0]} = {values[0]};", op)
            return
        temps = []
        for v, t in zip(values, types):
            tmp = self.fresh("next")
            temps.append(tmp)
            self.emit(indent, f"const {self.ctype(t)} {tmp} = {v};", op)
        for tgt, tmp in zip(targets, temps):
            self.emit(indent, f"{tgt} = {tmp};", op)

    code_for_op: dict = {}   # CODE_FOR_OP, set below the class; a subclass may extend a copy

    def op_value(self, op: Op, indent: int):
        self.define(indent, op, self.expr(op))

    def op_store(self, op: Op, indent: int):
        p, i, v = op.operands
        val = self.cname(v)
        if v.type == boolean:
            val = f"({self.d.bool_storage})({val})"
        self.emit(indent, f"{self.cname(p)}[{self.cname(i)}] = {val};", op)

    def op_barrier(self, op: Op, indent: int):
        self.emit(indent, self.d.barrier, op)

    def op_fence(self, op: Op, indent: int):
        self.emit(indent, self.d.fence, op)

    def op_safepoint(self, op: Op, indent: int):
        self.emit(indent, f"/* safepoint {op.attr('id')} */", op)

    def op_local_alloc(self, op: Op, indent: int):
        r = op.results[0]
        self.spaces[r.name] = "local"
        self.emit(indent, self.d.local_decl.format(type=self.storage(r.type.elem),
                                                   name=self.cname(r), size=op.attr("size")), op)

    def declare_results(self, op: Op, indent: int) -> list[str]:
        names = [self.cname(r) for r in op.results]
        for r in op.results:
            self.emit(indent, self.declare(r), op)
        return names

    def op_if(self, op: Op, indent: int):
        results = self.declare_results(op, indent)
        types = [r.type for r in op.results]

        def end(values, ind, term):
            self.assign_all(results, values, types, ind, term)
        self.emit(indent, f"if ({self.cname(op.operands[0])}) {{", op)
        self.block(op.regions[0], indent + 1, end)
        else_ops = op.regions[1].ops
        if not (len(else_ops) == 1 and else_ops[0].name == "yield" and not else_ops[0].operands):
            self.emit(indent, "} else {")
            self.block(op.regions[1], indent + 1, end)
        self.emit(indent, "}")

    def op_for(self, op: Op, indent: int):
        lo, hi, step = (self.cname(v) for v in op.operands[:3])
        body = op.regions[0]
        iv, args = body.args[0], body.args[1:]
        carried = [self.cname(a) for a in args]
        for a, init in zip(args, op.operands[3:]):
            self.emit(indent, self.declare(a, self.cname(init)), op)
        t, ut = self.ctype(iv.type), self.ctype(_UNSIGNED[iv.type.name])
        i = self.cname(iv)
        s = self.consts.get(op.operands[2].name)
        cond = (f"{i} < {hi}" if s is not None and s > 0 else f"{i} > {hi}" if s is not None and s < 0
                else "false" if s == 0 else f"({step} > 0 ? {i} < {hi} : ({step} < 0 && {i} > {hi}))")
        init = self.declare(iv, lo)[:-1]
        self.emit(indent, f"for ({init}; {cond}; {i} = ({t})(({ut}){i} + ({ut}){step})) {{", op)

        def end(values, ind, term):
            self.assign_all(carried, values, [a.type for a in args], ind, term)
        self.block(body, indent + 1, end)
        self.emit(indent, "}")
        for r, a in zip(op.results, carried):
            self.emit(indent, self.declare(r, a, const=True))

    def op_while(self, op: Op, indent: int):
        before, after = op.regions
        carried = [self.cname(a) for a in before.args]
        for a, init in zip(before.args, op.operands):
            self.emit(indent, self.declare(a, self.cname(init)), op)
        results = self.declare_results(op, indent)
        self.emit(indent, "for (;;) {", op)

        def on_condition(values, ind, term):
            cond, fwd = values[0], values[1:]
            self.emit(ind, f"if (!{cond}) {{", term)
            self.assign_all(results, fwd, [r.type for r in op.results], ind + 1, term)
            self.emit(ind + 1, "break;")
            self.emit(ind, "}")
            for a, v in zip(after.args, fwd):
                self.emit(ind, self.declare(a, v, const=True))
            self.block(after, ind, on_yield)

        def on_yield(values, ind, term):
            self.assign_all(carried, values, [a.type for a in before.args], ind, term)
        self.block(before, indent + 1, on_condition)
        self.emit(indent, "}")

    def clock_expr(self, op: Op) -> str:
        if not self.d.clock:
            raise CompileError(f"{where(op.where)}the {self.d.name} renderer has no spelling for "
                               f"op 'clock' (this target has no device timestamp)")
        return self.d.clock

    # -- expressions: each op is spelled by its entry in CODE_FOR_OP (below the class)
    def expr(self, op: Op) -> str:
        spell = self.code_for_op.get(op.name)
        if spell is None:
            types = ", ".join(str(v.type) for v in op.operands) or "no operands"
            raise CompileError(f"{where(op.where)}the {self.d.name} renderer has no spelling for "
                               f"op '{op.name}' on ({types})")
        ins = [self.cname(v) for v in op.operands]
        t = op.operands[-1].type if op.operands else op.results[0].type
        return spell(self, op, ins, t)

    def const_expr(self, op: Op, ins, t) -> str:
        self.consts[op.results[0].name] = op.attr("value")
        return self.literal(op)

    def load_expr(self, op: Op, ins, t) -> str:
        p, idx = ins
        elem = op.operands[0].type.elem
        if op.attr("volatile"):   # a poll of memory the host writes while the kernel runs
            space = self.d.global_ptr if self.spaces.get(op.operands[0].name) == "global" else ""
            p = f"((volatile {space}{self.storage(elem)}*){p})"
        return f"({p}[{idx}] != 0)" if elem == boolean else f"{p}[{idx}]"

    def arith(self, op: Op, ins, t) -> str:
        """add, sub, mul, div, rem, min, max, neg, abs: integers through the unsigned type
        (wraparound is defined) and helpers; floats natively or through helpers."""
        name, c = op.name, self.ctype(t)
        if t.is_float:
            if name in ("add", "sub", "mul", "div"):
                return f"({ins[0]} {_INFIX[name]} {ins[1]})"
            if name == "neg":
                return f"(-{ins[0]})"
            if name in ("min", "max"):
                self.helper(f"float_{name}", t, t=t.name, c=c)
                return f"cc_{name}_{t.name}({ins[0]}, {ins[1]})"
            return self.math_call(op, ins, t)
        u = self.ctype(_UNSIGNED[t.name])
        if name in ("add", "sub", "mul"):
            return f"({c})(({u}){ins[0]} {_INFIX[name]} ({u}){ins[1]})"
        if name == "neg":
            return f"({c})(({u})0 - ({u}){ins[0]})"
        if name in ("min", "max"):
            cmp = "<" if name == "min" else ">"
            return f"({ins[0]} {cmp} {ins[1]} ? {ins[0]} : {ins[1]})"
        self.helper(f"int_{name}", t, t=t.name, c=c, u=u, signed=t.is_signed,
                    min=self.int_literal(t, t.min))
        return f"cc_{name}_{t.name}({', '.join(ins)})"

    def bitwise(self, op: Op, ins, t) -> str:
        if op.name == "not":
            return f"(!{ins[0]})" if t == boolean else f"(~{ins[0]})"
        return f"({ins[0]} {_INFIX[op.name]} {ins[1]})"

    def shift(self, op: Op, ins, t) -> str:
        if op.name == "shl":
            c, u = self.ctype(t), self.ctype(_UNSIGNED[t.name])
            return f"({c})(({u}){ins[0]} << ({ins[1]} & {t.bits - 1}))"
        return f"({ins[0]} >> ({ins[1]} & {t.bits - 1}))"

    def math_call(self, op: Op, ins, t) -> str:
        fn = {"rem": "fmod", "abs": "fabs"}.get(op.name, op.name)
        return f"{self.d.math(fn, t.name)}({', '.join(ins)})"

    def bit_count(self, op: Op, ins, t) -> str:
        """popcount, clz: the dialect's intrinsic for the width, cast to the operand's type."""
        spelled = self.d.bit_counts[f"{op.name}{t.bits}"].format(x=ins[0])
        return f"({self.ctype(t)}){spelled}"

    def atomic(self, op: Op, ins: list[str]) -> str:
        p, idx = op.operands[0], ins[1]
        t = op.results[0].type
        if op.name == "atomic_cas" and "cc_cas_" in self.d.atomics["atomic_cas"]:
            self.helper("cas", t, t=t.name, c=self.ctype(t))
        fmt = self.d.atomics[op.name]
        space = self.spaces.get(p.name, "global")
        return fmt.format(p=f"&{self.cname(p)}[{idx}]", v=ins[-1],
                          cmp=ins[2] if op.name == "atomic_cas" else "",
                          scope=self.d.atomic_scope.get(space, ""), t=t.name)

    def cast(self, src: ScalarType, dst: ScalarType, x: str) -> str:
        if dst == boolean:
            return f"({x} != 0)"
        if src == boolean:
            return f"({self.ctype(dst)})({x} ? 1 : 0)"
        if src.is_float and dst.is_int:
            hi = float(1 << (dst.bits - (1 if dst.is_signed else 0)))
            self.helper("float_to_int", (src, dst), src=self.ctype(src), dst=self.ctype(dst),
                        src_t=src.name, dst_t=dst.name, hi=self.float_literal(src, hi),
                        lo=self.float_literal(src, float(dst.min)),
                        min=self.int_literal(dst, dst.min), max=self.int_literal(dst, dst.max))
            return f"cc_{src.name}_to_{dst.name}({x})"
        return f"({self.ctype(dst)}){x}"

    def bits(self, src: ScalarType, dst: ScalarType, x: str) -> str:
        self.helper("bits", (src, dst), src=self.ctype(src), dst=self.ctype(dst),
                    src_t=src.name, dst_t=dst.name)
        return f"cc_bits_{src.name}_{dst.name}({x})"

    # -- literals
    def literal(self, op: Op) -> str:
        t = op.results[0].type
        if t.is_float:
            value = float_from_bits(op.attr("bits"), t.bits)
            if math.isfinite(value):
                return self.float_literal(t, value)
            raw = _UNSIGNED["u32" if t.bits == 32 else "u64"]
            return self.bits(raw, t, self.int_literal(raw, op.attr("bits")))
        if t == boolean:
            return "true" if op.attr("value") else "false"
        return self.int_literal(t, op.attr("value"))

    def int_literal(self, t: ScalarType, v: int) -> str:
        suffix = {"i32": "", "u32": "u", "i64": self.d.int64_suffix,
                  "u64": "U" + self.d.int64_suffix}[t.name]
        if t.is_signed and v == t.min:
            return f"({t.min + 1}{suffix} - 1)"
        return f"({v}{suffix})" if v < 0 else f"{v}{suffix}"

    def float_literal(self, t: ScalarType, v: float) -> str:
        text = float.hex(v) + ("f" if t == f32 else "")
        return f"({text})" if text.startswith("-") else text

    def helper(self, kind: str, key, **fields):
        name = f"{kind}:{key}"
        if name not in self.helpers:
            self.helpers[name] = getattr(self.helpers_tpl, kind)(
                dict(prefix=self.d.helper_prefix, **fields)).strip()



@lru_cache(maxsize=1)
def _helpers_module():
    """The helper macros of templates/helpers.j2 (read-only once made: shared by renderers)."""
    return _ENV.get_template("helpers.j2").module


def _infix(op: str):
    return lambda r, o, ins, t: f"({ins[0]} {op} {ins[1]})"


# How each op is spelled: one entry per op the C family can express (`r` is the renderer).
CODE_FOR_OP = {
    "const": CStyleRenderer.const_expr,
    **{name: (lambda r, op, ins, t: r.d.ids[op.name][op.attr("dim")]) for name in BUILTINS},
    "clock": lambda r, op, ins, t: r.clock_expr(op),
    "load": CStyleRenderer.load_expr,
    **{name: (lambda r, op, ins, t: r.atomic(op, ins)) for name in ATOMICS},
    **{name: _infix(_INFIX[name]) for name in COMPARE},
    "select": lambda r, op, ins, t: f"({ins[0]} ? {ins[1]} : {ins[2]})",
    "cast": lambda r, op, ins, t: r.cast(op.operands[0].type, op.results[0].type, ins[0]),
    "bitcast": lambda r, op, ins, t: r.bits(op.operands[0].type, op.results[0].type, ins[0]),
    **{name: CStyleRenderer.arith for name in ("add", "sub", "mul", "div", "rem", "min", "max",
                                                "neg", "abs")},
    **{name: CStyleRenderer.bitwise for name in ("and", "or", "xor", "not")},
    "shl": CStyleRenderer.shift, "shr": CStyleRenderer.shift,
    **{name: CStyleRenderer.math_call for name in ("sqrt", "floor", "ceil", "fma")},
    "popcount": CStyleRenderer.bit_count, "clz": CStyleRenderer.bit_count,
}
CStyleRenderer.code_for_op = CODE_FOR_OP


def _mentions_f64(t) -> bool:
    return (t.elem if isinstance(t, PtrType) else t).name == "f64"



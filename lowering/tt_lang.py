"""IR -> TT-Lang: the tile tier of the Tenstorrent lowering.

A Tensix core computes on 32x32 tiles that data-movement cores bring over the NoC. A kernel
fits that model when every global access is `buf[global_id(0)]` (one tile holds 1024
consecutive work-items), every op has a tile form, and every loop runs a count the host knows
at launch. Such a kernel becomes a TT-Lang program: a reader that copies the tiles of the
inputs into dataflow buffers, a compute kernel that evaluates the IR on whole tiles (divergent
control flow as 0/1 mask tiles and `where`), and a writer; the tiles are spread over a grid of
cores. Anything else is refused with the op and line that stop it; the scalar tier
(tt_metalium.py) runs those kernels instead.

Tile types: f32 and i32 are native; u32 rides in i32 tiles (the same bits; comparisons and
min/max add 2^31 first); bool is a 0/1 tile of its producer's type. Constants and scalar
parameters are one-tile inputs: the simulator's `fill` makes bfloat16, which would round them.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import jinja2

from concordia_ir.errors import TileRefusal
from concordia_ir.opdefs import ATOMICS
from concordia_ir.ops import Block, Kernel, Op, Value, walk
from concordia_ir.printer import float_from_bits
from concordia_ir.types import PtrType, ScalarType

TILE = 32 * 32   # work-items per tile

_ENV = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"),
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                          undefined=jinja2.StrictUndefined)
_ENV.filters["add_prefix"] = lambda n: f"t_{n}"

_NAME = re.compile(r"[A-Za-z_]\w*")
_TILE_DTYPE = {"f32": "float32", "i32": "int32", "u32": "int32"}
_BINARY = {"add": "({a} + {b})", "sub": "({a} - {b})", "mul": "({a} * {b})"}
_COMPARE = {"eq": "ttl.math.eq({a}, {b})", "ne": "ttl.math.ne({a}, {b})",
            "lt": "ttl.math.lt({a}, {b})", "gt": "ttl.math.gt({a}, {b})",
            "le": "ttl.math.max(ttl.math.lt({a}, {b}), ttl.math.eq({a}, {b}))",
            "ge": "ttl.math.max(ttl.math.gt({a}, {b}), ttl.math.eq({a}, {b}))"}


@dataclass(frozen=True)
class TileInput:
    """One tensor the program reads: a kernel buffer, the work-item ids, or a uniform tile."""
    kind: str                 # "buffer" | "gid" | "const" | "scalar"
    name: str                 # program argument name
    dtype: str                # "float32" | "int32"
    param: int = -1           # kernel parameter index (buffer, scalar)
    value: object = None      # const value (python number)


@dataclass
class TileProgram:
    kernel: Kernel
    source: str
    inputs: list[TileInput]
    outputs: list[tuple[int, str, str]]          # (param index, program argument, dtype)
    buffer_dtypes: dict[int, str] = field(default_factory=dict)


@dataclass
class _Tile:
    expr: str                 # python variable holding the block
    dtype: str                # tile dtype
    unsigned: bool = False    # u32 in an i32 tile
    bool_: bool = False


class TileLowering:
    """Walks one kernel; emits the compute body as python lines, or raises TileRefusal."""

    def __init__(self, kernel: Kernel):
        self.k = kernel
        self.lines: list[tuple[int, str, str | None, set[str]]] = []  # indent, text, defines, uses
        self.inputs: dict[tuple, TileInput] = {}
        self.env: dict[str, object] = {}      # IR value name -> _Tile | ("py", expr) | ("gid",)
        self.current: dict[int, _Tile] = {}   # buffer param index -> its tile as last stored
        self.buffer_dtypes: dict[int, str] = {}
        self.stored: list[int] = []
        self.needs_old: set[int] = set()      # stored buffers whose old tile must be read
        self.alive: str | None = None
        self.loop_depth = 0
        self.n = 0

    # -- errors and names
    def refuse(self, op: Op | None, why: str):
        if op is None:
            raise TileRefusal(f"kernel {self.k.name}: {why}; not expressible on tiles")
        at = f" at line {op.where.line}" if op.where is not None else ""
        raise TileRefusal(f"kernel {self.k.name}: {op.name}{at}: {why}; not expressible on tiles")

    def var(self, hint: str) -> str:
        self.n += 1
        return f"{hint}{self.n}"

    def emit(self, indent: int, text: str, defines: str | None = None):
        """A line of the compute body; the names it reads come from its text (every generated
        name is one identifier), for the liveness pass in live_lines()."""
        rhs = text.split(" = ", 1)[1] if defines is not None else text
        self.lines.append((indent, text, defines, set(_NAME.findall(rhs))))

    def tile(self, op: Op, v: Value) -> _Tile:
        t = self.env.get(v.name)
        if isinstance(t, _Tile):
            return t
        if isinstance(t, tuple) and t[0] == "py":
            return self.uniform_tile(op, v, t[1])
        self.refuse(op, f"operand %{v.name} has no tile form")

    # -- inputs
    def add_input(self, key, make) -> TileInput:
        if key not in self.inputs:
            self.inputs[key] = make(f"in{len(self.inputs)}")
        return self.inputs[key]

    def uniform_tile(self, op: Op, v: Value, py: str) -> _Tile:
        """A uniform value (constant or scalar parameter) as a one-tile input."""
        t = v.type
        if t.name not in _TILE_DTYPE:
            self.refuse(op, f"{t} values have no tile type")
        dtype = _TILE_DTYPE[t.name]
        src = self.env.get(v.name)
        if isinstance(src, tuple) and src[0] == "py" and src[1].startswith("S["):
            pidx = [p.name for p in self.k.params].index(v.name)
            inp = self.add_input(("scalar", pidx), lambda n: TileInput("scalar", n, dtype, pidx))
        elif py == "G":
            self.refuse(op, "global_size as a tile value")
        else:
            value = eval(py)   # a literal printed by this module
            inp = self.add_input(("const", repr(value), dtype),
                                 lambda n: TileInput("const", n, dtype, value=value))
        return _Tile(inp.name, dtype, unsigned=t.name == "u32")

    def buffer_tile(self, op: Op, pidx: int, dtype: str) -> _Tile:
        p = self.k.params[pidx]
        known = self.buffer_dtypes.setdefault(pidx, dtype)
        if known != dtype:
            self.refuse(op, f"%{p.name} is used as both {known} and {dtype} tiles")
        inp = self.add_input(("buffer", pidx), lambda n: TileInput("buffer", n, dtype, pidx))
        return _Tile(inp.name, dtype, unsigned=p.type.elem.name == "u32",
                     bool_=p.type.elem.name == "bool")

    def const_tile(self, value, dtype: str) -> str:
        return self.add_input(("const", repr(value), dtype),
                              lambda n: TileInput("const", n, dtype, value=value)).name

    # -- masks
    def mask_and(self, a: str | None, b: str | None, indent: int) -> str | None:
        if a is None or b is None:
            return a or b
        return self.define(indent, f"({a} * {b})", "m")

    def mask_not(self, m: str, dtype: str, indent: int) -> str:
        one = self.const_tile(1 if dtype == "int32" else 1.0, dtype)
        return self.define(indent, f"({one} - {m})", "m")

    def define(self, indent: int, expr: str, hint: str) -> str:
        name = self.var(hint)
        self.emit(indent, f"{name} = {expr}", name)
        return name

    # -- walk
    def lower(self) -> TileProgram:
        for i, p in enumerate(self.k.params):
            if isinstance(p.type, PtrType):
                if p.type.elem.name not in ("f32", "i32", "u32", "bool"):
                    self.refuse(None, f"buffer %{p.name} holds {p.type.elem}: Tensix tiles hold "
                                      "32-bit types (64-bit types run on the scalar tier)")
            else:
                self.env[p.name] = ("py", f"S[{p.name!r}]")
        self.block(self.k.body, 0, None)
        prologue = []
        for pidx in self.stored:
            if pidx in self.needs_old:
                old = self.buffer_tile(None, pidx, self.buffer_dtypes[pidx])
                prologue.append((0, f"b{pidx} = {old.expr}", f"b{pidx}", {old.expr}))
        if self.alive:
            one = self.const_tile(1, "int32")
            prologue.append((0, f"alive = {one}", "alive", {one}))
        self.lines[:0] = prologue
        outputs = []
        for pidx in self.stored:
            name = f"out{len(outputs)}"
            outputs.append((pidx, name, self.buffer_dtypes[pidx]))
            self.emit(0, f"o_{name}.store(b{pidx})", None)
        if not outputs:
            self.refuse(None, "it stores nothing")
        return self.program(outputs)

    def block(self, b: Block, indent: int, mask: str | None):
        """Returns the yielded tiles, or None when the block returned."""
        for op in b.ops:
            if op.name in ("yield", "condition"):
                return [self.env[v.name] for v in op.operands]
            if op.name == "return":
                if mask is None and self.loop_depth == 0:
                    return None   # nothing after it runs
                dead = self.mask_not(mask, self.dtype_of(mask), indent) if mask is not None \
                    else self.const_tile(0, "int32")
                # `alive` starts as a 1-tile (inserted at the top) and only ever shrinks
                self.emit(indent, f"alive = carry(alive * {dead})", "alive")
                self.alive = "alive"
                return None
            handler = getattr(self, "op_" + op.name, None)
            if handler is None:
                self.refuse(op, self.why_not(op))
            handler(op, indent, mask)
        return None

    def why_not(self, op: Op) -> str:
        return _NO_TILE_FORM.get(op.name, "no tile form")

    def dtype_of(self, name: str) -> str:
        for t in self.env.values():
            if isinstance(t, _Tile) and t.expr == name:
                return t.dtype
        return "int32"

    def set(self, op: Op, tile: _Tile):
        self.env[op.result.name] = tile

    # -- ops
    def op_const(self, op, indent, mask):
        t = op.result.type
        if t.is_float:
            value = float_from_bits(op.attr("bits"), t.bits)
            text = repr(value) if value == value and abs(value) != float("inf") else \
                f"float({str(value)!r})"
        else:
            text = repr(int(op.attr("value")))
        self.env[op.result.name] = ("py", text)

    def op_global_id(self, op, indent, mask):
        if op.attr("dim") != 0:
            self.refuse(op, "tiles number work-items along dimension 0 only")
        inp = self.add_input(("gid",), lambda n: TileInput("gid", n, "int32"))
        self.env[op.result.name] = _Tile(inp.name, "int32")
        self.gid = op.result.name

    def op_global_size(self, op, indent, mask):
        if op.attr("dim") != 0:
            self.refuse(op, "tiles number work-items along dimension 0 only")
        self.env[op.result.name] = ("py", "G")

    def _index_ok(self, op, idx: Value):
        if idx.name != getattr(self, "gid", None):
            self.refuse(op, "the index is not global_id(0): a gather/scatter")

    def op_load(self, op, indent, mask):
        p, idx = op.operands
        if p not in self.k.params:
            self.refuse(op, "only kernel buffers are tiled")
        self._index_ok(op, idx)
        pidx = self.k.params.index(p)
        if pidx in self.current:
            self.set(op, self.current[pidx])
            return
        elem = p.type.elem.name
        dtype = _TILE_DTYPE.get(elem) or self.bool_dtype_for(op.result)
        self.set(op, self.buffer_tile(op, pidx, dtype))

    def bool_dtype_for(self, v: Value) -> str:
        """A loaded bool takes the tile type of what it flows into (a cast's target)."""
        for o in self.k.walk():
            if v in o.operands and o.name == "cast" and o.result.type.name in _TILE_DTYPE:
                return _TILE_DTYPE[o.result.type.name]
        return "int32"

    def op_store(self, op, indent, mask):
        p, idx, v = op.operands
        self._index_ok(op, idx)
        pidx = self.k.params.index(p)
        val = self.tile(op, v)
        known = self.buffer_dtypes.setdefault(pidx, val.dtype)
        if known != val.dtype:
            self.refuse(op, f"%{p.name} would need both {known} and {val.dtype} tiles")
        m = self.mask_and(mask, self.alive, indent)
        var = f"b{pidx}"   # the buffer's tile as stored so far: one name, so loops carry it
        if pidx not in self.stored:
            self.stored.append(pidx)
            if m is not None or self.loop_depth:
                self.needs_old.add(pidx)
        if m is not None:
            self.emit(indent, f"{var} = carry(ttl.block.where({m}, {val.expr}, {var}))", var)
        else:
            self.emit(indent, f"{var} = carry({val.expr})", var)
        self.current[pidx] = _Tile(var, val.dtype, val.unsigned, val.bool_)

    def op_select(self, op, indent, mask):
        c, a, b = (self.tile(op, v) for v in op.operands)
        self.value(op, indent, f"ttl.block.where({c.expr}, {a.expr}, {b.expr})", a)

    def value(self, op, indent, expr, like: _Tile, bool_=False):
        name = self.define(indent, expr, "v")
        self.set(op, _Tile(name, like.dtype, like.unsigned and not bool_, bool_))

    def biased(self, t: _Tile, indent: int) -> str:
        """u32 order as i32 order: add 2^31 (wrapping), which flips the sign bit."""
        if not t.unsigned:
            return t.expr
        bias = self.const_tile(-2 ** 31, "int32")
        return self.define(indent, f"({t.expr} + {bias})", "u")

    def _binary(self, op, indent, mask):
        t: ScalarType = op.result.type
        a, b = (self.tile(op, v) for v in op.operands)
        if t.name not in _TILE_DTYPE:
            self.refuse(op, f"{t} has no tile type")
        if op.name in _BINARY:
            self.value(op, indent, _BINARY[op.name].format(a=a.expr, b=b.expr), a)
        elif op.name == "div" and t.is_float:
            self.value(op, indent, f"({a.expr} / {b.expr})", a)
        elif op.name in ("div", "rem") and t.name == "i32":
            self.int_division(op, indent, a, b)
        elif op.name in ("min", "max") and t.is_float:
            self.float_minmax(op, indent, a, b)
        elif op.name in ("min", "max"):
            pick = "lt" if op.name == "min" else "gt"
            x, y = self.biased(a, indent), self.biased(b, indent)
            c = self.define(indent, f"ttl.math.{pick}({x}, {y})", "c")
            self.value(op, indent, f"ttl.block.where({c}, {a.expr}, {b.expr})", a)
        else:
            why = ("tiles have no C-style fmod" if t.is_float else
                   f"tile {op.name} of u32 needs unsigned division, which tiles lack")
            self.refuse(op, why)

    op_add = op_sub = op_mul = op_div = op_rem = op_min = op_max = _binary

    def float_minmax(self, op, indent, a, b):
        """semantics.md: NaN loses; equal operands (-0/+0 too) give the first."""
        cmp = "lt" if op.name == "min" else "gt"
        e = self.define(indent, f"ttl.math.max(ttl.math.{cmp}({a.expr}, {b.expr}), "
                                f"ttl.math.eq({a.expr}, {b.expr}))", "c")
        pick = self.define(indent, f"ttl.block.where({e}, {a.expr}, {b.expr})", "v")
        bnan = self.define(indent, f"ttl.block.where(ttl.math.ne({b.expr}, {b.expr}), {a.expr}, "
                                   f"{pick})", "v")
        self.value(op, indent, f"ttl.block.where(ttl.math.ne({a.expr}, {a.expr}), {b.expr}, "
                               f"{bnan})", a)

    def int_division(self, op, indent, a, b):
        """Truncating i32 division with RISC-V's rules from the tiles' floor division."""
        z, one, m1 = (self.const_tile(v, "int32") for v in (0, 1, -1))
        imin = self.const_tile(-2 ** 31, "int32")
        d = lambda expr: self.define(indent, expr, "d")  # noqa: E731
        zero = d(f"ttl.math.eq({b.expr}, {z})")
        ovf = d(f"(ttl.math.eq({a.expr}, {imin}) * ttl.math.eq({b.expr}, {m1}))")
        safe = d(f"ttl.block.where(ttl.math.max({zero}, {ovf}), {one}, {b.expr})")
        q = d(f"({a.expr} // {safe})")
        r = d(f"({a.expr} - {q} * {safe})")
        # floor -> trunc: step back toward zero where a remainder has the divisor's other sign
        fix = d(f"(ttl.math.ne({r}, {z}) * ttl.math.ne(ttl.math.lt({a.expr}, {z}), "
                f"ttl.math.lt({safe}, {z})))")
        if op.name == "div":
            qt = d(f"({q} + {fix})")
            qo = d(f"ttl.block.where({ovf}, {imin}, {qt})")
            self.value(op, indent, f"ttl.block.where({zero}, {m1}, {qo})", a)
        else:
            rt = d(f"({r} - {fix} * {safe})")
            ro = d(f"ttl.block.where({ovf}, {z}, {rt})")
            self.value(op, indent, f"ttl.block.where({zero}, {a.expr}, {ro})", a)

    def _compare(self, op, indent, mask):
        a, b = (self.tile(op, v) for v in op.operands)
        if op.operands[0].type.name not in _TILE_DTYPE:
            self.refuse(op, f"{op.operands[0].type} has no tile type")
        x, y = self.biased(a, indent), self.biased(b, indent)
        self.value(op, indent, _COMPARE[op.name].format(a=x, b=y), a, bool_=True)

    op_eq = op_ne = op_lt = op_le = op_gt = op_ge = _compare

    def _unary(self, op, indent, mask):
        t = op.result.type
        a = self.tile(op, op.operands[0])
        if t.name not in _TILE_DTYPE:
            self.refuse(op, f"{t} has no tile type")
        if op.name == "sqrt":
            self.refuse(op, "tile sqrt is not correctly rounded (SFPU approximation; the "
                            "simulator's torch.sqrt is off by 1 ulp too)")
        if op.name == "abs" and t.name == "u32":
            self.set(op, a)
        elif op.name == "neg" and t.is_int:
            z = self.const_tile(0, "int32")
            self.value(op, indent, f"({z} - {a.expr})", a)
        elif op.name in ("neg", "abs") or t.is_float:
            self.value(op, indent, f"ttl.math.{op.name}({a.expr})", a)
        else:
            self.refuse(op, "no tile form")

    op_neg = op_abs = op_sqrt = op_floor = op_ceil = _unary

    def op_cast(self, op, indent, mask):
        src, dst = op.operands[0].type, op.result.type
        a = self.tile(op, op.operands[0])
        if dst.name == "bool":
            z = self.const_tile(0 if a.dtype == "int32" else 0.0, a.dtype)
            self.value(op, indent, f"ttl.math.ne({a.expr}, {z})", a, bool_=True)
        elif src.name == "bool" and dst.name in _TILE_DTYPE and a.dtype == _TILE_DTYPE[dst.name]:
            self.set(op, _Tile(a.expr, a.dtype, dst.name == "u32"))
        elif {src.name, dst.name} == {"i32", "u32"}:
            self.set(op, _Tile(a.expr, a.dtype, dst.name == "u32"))
        else:
            self.refuse(op, f"tiles have no in-kernel conversion from {src} to {dst}")

    def op_if(self, op, indent, mask):
        c = self.tile(op, op.operands[0])
        then_m = self.mask_and(mask, c.expr, indent)
        not_c = self.mask_not(c.expr, c.dtype, indent)
        else_m = self.mask_and(mask, not_c, indent)
        outs = []
        for region, m in zip(op.regions, (then_m, else_m)):
            vals = self.block(region, indent, m)
            outs.append(vals)
        for k, r in enumerate(op.results):
            t, e = (outs[0] or [None] * len(op.results))[k], (outs[1] or [None] * len(op.results))[k]
            if t is None or e is None:
                self.env[r.name] = t if e is None else e   # the other branch returned
                continue
            t, e = self.as_tile(op, op.regions[0], t), self.as_tile(op, op.regions[1], e)
            name = self.define(indent, f"ttl.block.where({c.expr}, {t.expr}, {e.expr})", "v")
            self.env[r.name] = _Tile(name, t.dtype, t.unsigned, t.bool_)

    def as_tile(self, op, region, v) -> _Tile:
        if isinstance(v, _Tile):
            return v
        term = region.ops[-1]
        for val, got in zip(term.operands, [self.env[x.name] for x in term.operands]):
            if got is v:
                return self.tile(op, val)
        self.refuse(op, "a yielded value has no tile form")

    def op_for(self, op, indent, mask):
        bounds = []
        for v in op.operands[:3]:
            src = self.env.get(v.name)
            if not (isinstance(src, tuple) and src[0] == "py"):
                self.refuse(op, "a loop whose trip count depends on data")
            bounds.append(src[1])
        body = op.regions[0]
        iv, args = body.args[0], body.args[1:]
        carried = []
        for a, init in zip(args, op.operands[3:]):
            t = self.tile(op, init)
            name = self.define(indent, t.expr, "k")
            carried.append(_Tile(name, t.dtype, t.unsigned, t.bool_))
        lo, hi, step = bounds
        uses_iv = any(iv in o.operands for o in walk(body))
        iv_tile = None
        if uses_iv:
            ivt = self.tile(op, op.operands[0])
            iv_tile = self.define(indent, ivt.expr, "i")
            step_tile = self.tile(op, op.operands[2])
        self.emit(indent, f"for _ in _trip({lo}, {hi}, {step}):")
        self.emit(indent + 1, "pass")
        self.loop_depth += 1
        for a, t in zip(args, carried):
            self.env[a.name] = t
        if uses_iv:
            self.env[iv.name] = _Tile(iv_tile, _TILE_DTYPE[iv.type.name])
        vals = self.block(body, indent + 1, mask)
        if vals is not None:
            tiles = [self.as_tile(op, body, v) for v in vals]
            temps = [self.define(indent + 1, t.expr, "n") for t in tiles]
            for c, tmp in zip(carried, temps):
                self.emit(indent + 1, f"{c.expr} = carry({tmp})", c.expr)
        if uses_iv:
            self.emit(indent + 1, f"{iv_tile} = carry({iv_tile} + {step_tile.expr})", iv_tile)
        self.loop_depth -= 1
        for r, c in zip(op.results, carried):
            self.env[r.name] = c

    # -- output
    def program(self, outputs) -> TileProgram:
        live = self.live_lines()
        inputs = [i for i in self.inputs.values() if i.name in live]
        body = [("    " * ind + text) for k, (ind, text, _, _) in enumerate(self.lines)
                if k in live["__lines__"]]
        uniform = {i.name for i in inputs if i.kind in ("const", "scalar")}
        tiled = [i.name for i in inputs if i.name not in uniform] + [o[1] for o in outputs]
        src = _ENV.get_template("tt_lang.py.j2").render(
            name=self.k.name, inputs=[i.name for i in inputs], uniform=uniform, tiled=tiled,
            outputs=[o[1] for o in outputs], body=body,
            source=(f"{os.path.basename(self.k.loc.file)}:{self.k.loc.line}"
                    if self.k.loc else None))
        return TileProgram(self.k, src, inputs, outputs, dict(self.buffer_dtypes))

    def live_lines(self) -> dict:
        """Drop lines whose value reaches no store: a block read but never stored trips the
        simulator's dataflow checks, and would be wasted NoC traffic on hardware."""
        needed: set[str] = set()
        keep: set[int] = set()
        changed = True
        while changed:
            changed = False
            for k, (_, text, defines, uses) in enumerate(self.lines):
                if k in keep:
                    continue
                if defines is None and not text.startswith("for ") or defines in needed:
                    keep.add(k)
                    needed |= uses
                    changed = True
        keep |= {k for k, (_, text, _, _) in enumerate(self.lines) if text.startswith("for ")}
        out = {name: True for name in needed}
        out["__lines__"] = keep
        return out


# Why each op without an op_ method above runs on the scalar tier (tests/test_opdefs.py checks
# that every declared op is either lowered or explained here).
_NO_TILE_FORM = {
    "while": "a loop whose trip count depends on data",
    "barrier": "work-group barriers have no tile form",
    "local_alloc": "local memory has no tile form",
    "safepoint": "safepoints run on the scalar tier",
    "fence": "tiles have no memory fence",
    "clock": "tiles have no device clock",
    "bitcast": "tiles have no in-kernel bit reinterpretation",
    **dict.fromkeys(("and", "or", "xor", "not"), "tiles have no bitwise ops"),
    **dict.fromkeys(("shl", "shr"), "tiles have no shifts"),
    **dict.fromkeys(("popcount", "clz"), "tiles have no bit counting"),
    **dict.fromkeys(("local_id", "group_id", "local_size", "num_groups"),
                    "tiles see one flat grid: work-group ids and sizes have no tile form"),
    **dict.fromkeys(ATOMICS, "atomics have no tile form"),
    "fma": "tiles round a*b before adding c (no fused multiply-add)",
}


def plan_tiles(kernel: Kernel) -> TileProgram:
    """The kernel as a TT-Lang program, or TileRefusal naming what stops it."""
    return TileLowering(kernel).lower()

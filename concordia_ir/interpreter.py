"""Reference interpreter: runs IR on numpy with exactly the semantics of docs/semantics.md.

Work-items are numpy lanes. A launch runs in chunks of whole work-groups; inside a chunk all
lanes advance in lock-step, with a mask per block for divergent control flow. Barriers are
therefore satisfied by construction (the verifier forbids them in divergent code). This is
the oracle of the conformance suite: clarity of semantics first, speed second.
"""
from __future__ import annotations

from fractions import Fraction

import time

import numpy as np

from .errors import KernelRuntimeError, where
from .opdefs import ATOMICS, BUILTINS, OPS
from .ops import Block, Kernel, Op
from .printer import float_from_bits
from .types import PtrType, ScalarType

MAX_LANES = 1 << 20  # lanes per chunk: bounds memory, keeps numpy calls large


# ---- scalar semantics on arrays -------------------------------------------------------------

def _full(value, t: ScalarType):
    return np.full(1, value, dtype=t.dtype)


def trunc_div(a: int, b: int) -> int:
    """C's integer division of two Python ints (b != 0): the quotient truncated toward zero."""
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def int_div(t: ScalarType, a, b):
    """trunc_div over arrays of type t; x/0 = all ones; MIN/-1 = MIN (RISC-V's rules)."""
    a, b = np.broadcast_arrays(a, b)
    zero = b == 0
    if t.is_signed:
        ovf = (a == t.min) & (b == -1)
        bs = np.where(zero | ovf, 1, b).astype(t.dtype)
        q = a // bs
        q = np.where(((a - q * bs) != 0) & ((a < 0) != (bs < 0)), q + 1, q).astype(t.dtype)
        q = np.where(ovf, _full(t.min, t), q)
    else:
        bs = np.where(zero, 1, b).astype(t.dtype)
        q = a // bs
    return np.where(zero, _full(-1 if t.is_signed else t.max, t), q).astype(t.dtype)


def int_rem(t: ScalarType, a, b):
    """Remainder with the sign of the dividend; x%0 = x; MIN%-1 = 0."""
    a, b = np.broadcast_arrays(a, b)
    zero = b == 0
    bs = np.where(zero, 1, b).astype(t.dtype)
    r = a - int_div(t, a, bs) * bs
    return np.where(zero, a, r).astype(t.dtype)


def float_min(a, b):
    """NaN loses to a number; equal values (including -0/+0) give the first operand."""
    return np.where(np.isnan(a), b, np.where(np.isnan(b), a, np.where(a <= b, a, b)))


def float_max(a, b):
    return np.where(np.isnan(a), b, np.where(np.isnan(b), a, np.where(a >= b, a, b)))


def fma32(a, b, c):
    """a*b+c rounded once: exact product in f64, two-sum, round-to-odd, then round to f32."""
    a64, b64, c64 = (np.asarray(x, np.float64) for x in (a, b, c))
    p = a64 * b64
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)
    even = (s.view(np.uint64) & np.uint64(1)) == 0
    nudge = (err != 0) & even & np.isfinite(s)
    toward = np.where(err > 0, np.inf, -np.inf)
    return np.where(nudge, np.nextafter(s, toward), s).astype(np.float32)


def fma64(a, b, c):
    a, b, c = np.broadcast_arrays(*(np.asarray(x, np.float64) for x in (a, b, c)))
    out = np.empty(a.shape, np.float64)
    for i, (x, y, z) in enumerate(zip(a.flat, b.flat, c.flat)):
        if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(z)):
            out.flat[i] = x * y + z
            continue
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        try:
            out.flat[i] = float(exact) if exact != 0 else (x * y + z)
        except OverflowError:
            out.flat[i] = np.inf if exact > 0 else -np.inf
    return out


def cast(src: ScalarType, dst: ScalarType, a):
    if src == dst:
        return a
    if dst.kind == "bool":
        return a != 0
    if src.is_float and dst.is_int:
        nan = np.isnan(a)
        high = a >= float(1 << (dst.bits - (1 if dst.is_signed else 0)))
        low = a < float(dst.min)
        ok = ~(nan | high | low)
        inner = np.where(ok, a, 0).astype(dst.dtype)
        return np.where(high, _full(dst.max, dst), np.where(low, _full(dst.min, dst),
                        np.where(nan, _full(0, dst), inner))).astype(dst.dtype)
    return a.astype(dst.dtype)


def popcount(t: ScalarType, a):
    """Set bits of the two's-complement pattern, by the SWAR sum of bit fields (numpy < 2 has
    no bitwise_count, and numpy 2's counts |a| for signed types)."""
    x = np.asarray(a, t.dtype).astype(np.uint64 if t.bits == 64 else np.uint32).astype(np.uint64)
    m1, m2, m4 = (np.uint64(0x5555555555555555), np.uint64(0x3333333333333333),
                  np.uint64(0x0F0F0F0F0F0F0F0F))
    x = x - ((x >> np.uint64(1)) & m1)
    x = (x & m2) + ((x >> np.uint64(2)) & m2)
    x = (x + (x >> np.uint64(4))) & m4
    return ((x * np.uint64(0x0101010101010101)) >> np.uint64(56)).astype(t.dtype)


def clz(t: ScalarType, a):
    """Leading zeros: the width minus the index of the highest set bit (clz(0) = width)."""
    u = np.asarray(a).astype(np.uint64 if t.bits == 64 else np.uint32)
    n = np.zeros(u.shape, dtype=np.int64)
    for shift in (32, 16, 8, 4, 2, 1):   # binary search for the highest set bit
        if shift >= t.bits:
            continue
        high = (u >> np.asarray(shift, u.dtype)) != 0
        n = np.where(high, n + shift, n)
        u = np.where(high, u >> np.asarray(shift, u.dtype), u)
    width = np.where(u != 0, n + 1, 0)
    return (t.bits - width).astype(t.dtype)


def _shift(t: ScalarType, fn, a, b):
    count = (b & (t.bits - 1)).astype(t.dtype)
    return fn(a, count).astype(t.dtype)


_ELEMENTWISE = {
    "add": lambda t, a, b: a + b,
    "sub": lambda t, a, b: a - b,
    "mul": lambda t, a, b: a * b,
    "div": lambda t, a, b: a / b if t.is_float else int_div(t, a, b),
    "rem": lambda t, a, b: np.fmod(a, b) if t.is_float else int_rem(t, a, b),
    "min": lambda t, a, b: float_min(a, b) if t.is_float else np.minimum(a, b),
    "max": lambda t, a, b: float_max(a, b) if t.is_float else np.maximum(a, b),
    "and": lambda t, a, b: a & b,
    "or": lambda t, a, b: a | b,
    "xor": lambda t, a, b: a ^ b,
    "shl": lambda t, a, b: _shift(t, np.left_shift, a, b),
    "shr": lambda t, a, b: _shift(t, np.right_shift, a, b),
    "neg": lambda t, a: np.negative(a),
    "not": lambda t, a: np.invert(a),
    "abs": lambda t, a: np.abs(a),
    "sqrt": lambda t, a: np.sqrt(a),
    "floor": lambda t, a: np.floor(a),
    "ceil": lambda t, a: np.ceil(a),
    "popcount": popcount,
    "clz": clz,
    "eq": lambda t, a, b: a == b,
    "ne": lambda t, a, b: a != b,
    "lt": lambda t, a, b: a < b,
    "le": lambda t, a, b: a <= b,
    "gt": lambda t, a, b: a > b,
    "ge": lambda t, a, b: a >= b,
    "select": lambda t, c, a, b: np.where(c, a, b),
    "fma": lambda t, a, b, c: fma32(a, b, c) if t.bits == 32 else fma64(a, b, c),
}


def _atomic_apply(name: str, old, v, cmp=None):
    if name == "atomic_min":
        return np.minimum(old, v)
    if name == "atomic_max":
        return np.maximum(old, v)
    if name == "atomic_xchg":
        return v
    return np.where(old == cmp, v, old)  # atomic_cas


# ---- memory ---------------------------------------------------------------------------------

class _Memory:
    """A buffer as seen by a kernel: a global array, or local memory with a per-group base."""

    def __init__(self, array: np.ndarray, name: str, base=None, size=None):
        self.array, self.name, self.base = array, name, base
        self.size = size if size is not None else array.size


# ---- the interpreter ------------------------------------------------------------------------

class Interpreter:
    def __init__(self, kernel: Kernel):
        self.kernel = kernel

    def run(self, args: list, global_size: tuple[int, int, int],
            local_size: tuple[int, int, int], max_lanes: int = MAX_LANES):
        """Run the kernel. `args`: numpy arrays for pointers, numpy scalars otherwise."""
        groups = tuple(g // l for g, l in zip(global_size, local_size))
        n_groups = groups[0] * groups[1] * groups[2]
        group_lanes = local_size[0] * local_size[1] * local_size[2]
        per_chunk = max(1, max_lanes // group_lanes)
        self.sizes = {"global_size": global_size, "local_size": local_size, "num_groups": groups}
        with np.errstate(all="ignore"):
            for start in range(0, n_groups, per_chunk):
                count = min(per_chunk, n_groups - start)
                self._run_chunk(args, start, count, groups, local_size, group_lanes)

    def _run_chunk(self, args, start, count, groups, local_size, group_lanes):
        n = count * group_lanes
        lane = np.arange(n, dtype=np.int64)
        self.group_in_chunk = lane // group_lanes
        lin_local = lane % group_lanes
        lin_group = self.group_in_chunk + start
        lx, ly, _ = local_size
        gx, gy, _ = groups
        local = (lin_local % lx, (lin_local // lx) % ly, lin_local // (lx * ly))
        group = (lin_group % gx, (lin_group // gx) % gy, lin_group // (gx * gy))
        self.ids = {"local_id": [x.astype(np.int32) for x in local],
                    "group_id": [x.astype(np.int32) for x in group]}
        self.ids["global_id"] = [(g * l + x).astype(np.int32)
                                 for g, l, x in zip(self.ids["group_id"], local_size,
                                                    self.ids["local_id"])]
        self.n = n
        self.alive = np.ones(n, dtype=bool)
        env = {}
        for p, a in zip(self.kernel.params, args):
            if isinstance(p.type, PtrType):
                env[p.name] = _Memory(a, p.name)
            else:
                env[p.name] = np.asarray(a, dtype=p.type.dtype).reshape(1)
        self.count = count
        self.block(self.kernel.body, env, np.ones(n, dtype=bool))

    # Returns the terminator's operand values, or None when the block returned.
    def block(self, b: Block, env: dict, mask: np.ndarray):
        for op in b.ops:
            name = op.name
            if name == "yield":
                return [env[v.name] for v in op.operands]
            if name == "condition":
                return [env[v.name] for v in op.operands]
            if name == "return":
                self.alive &= ~mask
                return None
            if op.regions:
                results = getattr(self, "op_" + name)(op, env, mask)
                mask = mask & self.alive
            else:
                results = self.simple(op, env, mask)
            for r, v in zip(op.results, results):
                env[r.name] = v
        return None

    def simple(self, op: Op, env, mask):
        name = op.name
        ins = [env[v.name] for v in op.operands]
        if name in _ELEMENTWISE:
            t = op.operands[0].type if OPS[name].result == "bool" else op.operands[-1].type
            return [np.asarray(_ELEMENTWISE[name](t, *ins)).astype(op.result.type.dtype, copy=False)]
        if name == "const":
            t = op.result.type
            if t.is_float:
                return [_full(float_from_bits(op.attr("bits"), t.bits), t)]
            return [_full(op.attr("value"), t)]
        if name == "cast":
            return [np.asarray(cast(op.operands[0].type, op.result.type, ins[0]))]
        if name == "bitcast":
            return [np.ascontiguousarray(ins[0]).view(op.result.type.dtype)]
        if name in BUILTINS:
            d = op.attr("dim")
            if name in self.ids:
                return [self.ids[name][d]]
            return [np.full(1, self.sizes[name][d], dtype=np.int32)]
        if name == "clock":
            return [np.full(1, time.monotonic_ns(), dtype=np.uint64)]
        if name == "load":
            return [self.load(op, ins[0], ins[1], mask)]
        if name == "store":
            self.store(op, ins[0], ins[1], ins[2], mask)
            return []
        if name in ATOMICS:
            return [self.atomic(op, ins, mask)]
        if name == "local_alloc":
            t = op.result.type.elem
            size = op.attr("size")
            arr = np.zeros(self.count * size, dtype=t.dtype)
            return [_Memory(arr, op.result.name, base=self.group_in_chunk * size, size=size)]
        if name in ("barrier", "safepoint", "fence"):   # lanes run in order: already fenced
            return []
        raise AssertionError(f"interpreter has no rule for op {name!r}")

    # -- memory access
    def addresses(self, op: Op, mem: _Memory, idx, mask):
        """Active lanes and their element addresses; raises on an out-of-bounds access."""
        lanes = np.nonzero(mask)[0]
        ix = np.broadcast_to(idx, (self.n,))[lanes].astype(np.int64)
        if ix.size:
            bad = (ix < 0) | (ix >= mem.size)
            if bad.any():
                k = int(np.argmax(bad))
                gid = [int(self.ids["global_id"][d][lanes[k]]) for d in range(3)]
                raise KernelRuntimeError(
                    f"{where(op.where)}kernel '{self.kernel.name}': {op.name} out of bounds: "
                    f"index {int(ix[k])} into %{mem.name} of {mem.size} elements "
                    f"(work-item {tuple(gid)})")
        if mem.base is not None:
            ix = ix + mem.base[lanes]
        return lanes, ix

    def load(self, op, mem: _Memory, idx, mask):
        lanes, ix = self.addresses(op, mem, idx, mask)
        if lanes.size == self.n:
            return mem.array[ix]
        out = np.zeros(self.n, dtype=mem.array.dtype)
        out[lanes] = mem.array[ix]
        return out

    def store(self, op, mem: _Memory, idx, val, mask):
        lanes, ix = self.addresses(op, mem, idx, mask)
        mem.array[ix] = np.broadcast_to(val, (self.n,))[lanes]

    def atomic(self, op, ins, mask):
        """Atomics in lane order: the result of one valid serialisation of the group's lanes."""
        mem, idx = ins[0], ins[1]
        lanes, ix = self.addresses(op, mem, idx, mask)
        vals = [np.broadcast_to(v, (self.n,))[lanes] for v in ins[2:]]
        out = np.zeros(self.n, dtype=mem.array.dtype)
        if lanes.size == 0:
            return out
        order = np.argsort(ix, kind="stable")
        sorted_ix = ix[order]
        seg_start = np.r_[True, sorted_ix[1:] != sorted_ix[:-1]]
        starts = np.nonzero(seg_start)[0]
        seg_id = np.cumsum(seg_start) - 1
        rank = np.arange(ix.size) - starts[seg_id]
        if op.name == "atomic_add":
            v = vals[0][order]
            incl = np.cumsum(v, dtype=v.dtype)
            base = incl[starts] - v[starts]
            excl = incl - v - base[seg_id]
            old_sorted = mem.array[sorted_ix] + excl
            old = np.empty_like(old_sorted)
            old[order] = old_sorted
            np.add.at(mem.array, ix, vals[0])
        else:
            old = np.empty(ix.size, dtype=mem.array.dtype)
            rank_of = np.empty_like(rank)
            rank_of[order] = rank
            for r in range(int(rank.max()) + 1):
                sel = rank_of == r
                cur = mem.array[ix[sel]]
                old[sel] = cur
                cmp = vals[0][sel] if op.name == "atomic_cas" else None
                new = vals[-1][sel]
                mem.array[ix[sel]] = _atomic_apply(op.name, cur, new, cmp)
        out[lanes] = old
        return out

    # -- structured control flow
    def merge(self, mask, new, old):
        return [np.where(mask, a, b) for a, b in zip(new, old)]

    def zeros_for(self, op):
        return [np.zeros(1, dtype=r.type.dtype) for r in op.results]

    def op_if(self, op, env, mask):
        c = np.broadcast_to(env[op.operands[0].name], (self.n,))
        then_mask, else_mask = mask & c, mask & ~c
        outs = []
        for region, m in zip(op.regions, (then_mask, else_mask)):
            vals = self.block(region, env, m) if m.any() else None
            outs.append(vals if vals is not None else self.zeros_for(op))
        return self.merge(c, outs[0], outs[1])

    def op_for(self, op, env, mask):
        lo, hi, step = (env[v.name] for v in op.operands[:3])
        carried = [env[v.name] for v in op.operands[3:]]
        body = op.regions[0]
        iv = np.broadcast_to(lo, (self.n,)).copy()

        def running(i):
            return ((step > 0) & (i < hi)) | ((step < 0) & (i > hi))
        active = mask & running(iv)
        while active.any():
            env[body.args[0].name] = iv
            for a, v in zip(body.args[1:], carried):
                env[a.name] = v
            vals = self.block(body, env, active)
            if vals is not None:
                carried = self.merge(active, vals, carried)
            iv = np.where(active, iv + step, iv).astype(iv.dtype)
            active = active & self.alive & running(iv)
        return carried

    def op_while(self, op, env, mask):
        before, after = op.regions
        carried = [env[v.name] for v in op.operands]
        results = self.zeros_for(op)
        active = mask.copy()
        while active.any():
            for a, v in zip(before.args, carried):
                env[a.name] = v
            cond = self.block(before, env, active)
            c, fwd = np.broadcast_to(cond[0], (self.n,)), cond[1:]
            results = self.merge(active & ~c, fwd, results)
            active = active & c
            if not active.any():
                break
            for a, v in zip(after.args, fwd):
                env[a.name] = v
            vals = self.block(after, env, active)
            if vals is not None:
                carried = self.merge(active, vals, carried)
            active = active & self.alive
        return results


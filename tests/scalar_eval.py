"""A deliberately plain, one-lane-at-a-time evaluator of the IR semantics (docs/semantics.md),
written without numpy arithmetic, to cross-check the vectorised interpreter."""
import math
import struct


def f32_round(x: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def wrap(t, v: int) -> int:
    v &= (1 << t.bits) - 1
    if t.is_signed and v >> (t.bits - 1):
        v -= 1 << t.bits
    return v


def fround(t, x: float) -> float:
    return f32_round(x) if t.bits == 32 else x


def trunc_div(a: int, b: int) -> int:
    q = abs(a) // abs(b)
    return q if (a < 0) == (b < 0) else -q


def evaluate(op, t, *xs):
    n = op
    if t.kind == "bool" and n in ("and", "or", "xor", "not", "eq", "ne"):
        a = xs[0]
        return {"and": lambda: a and xs[1], "or": lambda: a or xs[1], "xor": lambda: a != xs[1],
                "not": lambda: not a, "eq": lambda: a == xs[1], "ne": lambda: a != xs[1]}[n]()
    if n in ("eq", "ne", "lt", "le", "gt", "ge"):
        a, b = xs
        return {"eq": a == b, "ne": a != b, "lt": a < b, "le": a <= b, "gt": a > b, "ge": a >= b}[n]
    if t.is_float:
        a = xs[0]
        if n == "add": return fround(t, a + xs[1])
        if n == "sub": return fround(t, a - xs[1])
        if n == "mul": return fround(t, a * xs[1])
        if n == "div":
            b = xs[1]
            if b == 0:
                if a == 0 or math.isnan(a):
                    return math.nan
                return math.copysign(math.inf, a) * math.copysign(1, b)
            return fround(t, a / b)
        if n == "rem":
            b = xs[1]
            if math.isnan(a) or math.isnan(b) or math.isinf(a) or b == 0:
                return math.nan
            return math.fmod(a, b)
        if n in ("min", "max"):
            b = xs[1]
            if math.isnan(a): return b
            if math.isnan(b): return a
            return (a if a <= b else b) if n == "min" else (a if a >= b else b)
        if n == "neg": return -a
        if n == "abs": return abs(a)
        if n == "sqrt": return math.nan if a < 0 or math.isnan(a) else fround(t, math.sqrt(a))
        if n == "floor": return a if not math.isfinite(a) else float(math.floor(a)) if a != 0 else a
        if n == "ceil": return a if not math.isfinite(a) else (float(math.ceil(a)) if a != 0 else a) \
            if not (-1 < a < 0) else -0.0
        if n == "select": return xs[1] if a else xs[2]
    a = xs[0]
    if n == "add": return wrap(t, a + xs[1])
    if n == "sub": return wrap(t, a - xs[1])
    if n == "mul": return wrap(t, a * xs[1])
    if n == "div":
        b = xs[1]
        if b == 0: return wrap(t, -1)
        return wrap(t, trunc_div(a, b))
    if n == "rem":
        b = xs[1]
        if b == 0: return a
        return wrap(t, a - trunc_div(a, b) * b)
    if n == "min": return min(a, xs[1])
    if n == "max": return max(a, xs[1])
    if n == "and": return wrap(t, a & xs[1])
    if n == "or": return wrap(t, a | xs[1])
    if n == "xor": return wrap(t, a ^ xs[1])
    if n == "shl": return wrap(t, a << (xs[1] & (t.bits - 1)))
    if n == "shr": return wrap(t, a >> (xs[1] & (t.bits - 1)))
    if n == "neg": return wrap(t, -a)
    if n == "not": return wrap(t, ~a)
    if n == "abs": return wrap(t, abs(a))
    if n == "select": return xs[1] if a else xs[2]
    raise NotImplementedError(n)


def cast(src, dst, a):
    if dst.kind == "bool":
        return a != 0
    if src.kind == "bool":
        return float(a) if dst.is_float else int(a)
    if dst.is_float:
        return fround(dst, float(a))
    if src.is_float:
        if math.isnan(a): return 0
        if a >= 2.0 ** (dst.bits - (1 if dst.is_signed else 0)): return dst.max
        if a < dst.min: return dst.min
        return int(a)
    return wrap(dst, a)

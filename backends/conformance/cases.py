"""Conformance cases: each is one IR kernel plus inputs. The expected output is whatever the
reference interpreter computes; every backend must match it bit for bit (NaN payloads aside),
except outputs marked `multiset` (atomic old values, whose order is the device's choice).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from concordia_ir import (Ptr, atomic_add, atomic_cas, atomic_max, atomic_min, atomic_xchg,
                          barrier, f32, f64, global_id, group_id, i32, i64, kernel, local_array,
                          local_id, local_size, safepoint, sqrt, u32)
from concordia_ir.builtins import clz, popcount
from concordia_ir.builder import IRBuilder, Names
from concordia_ir.opdefs import COMPARE, names
from concordia_ir.ops import Block, Kernel, Value
from concordia_ir.types import SCALARS, PtrType, ScalarType, boolean, u64


@dataclass(frozen=True)
class Case:
    name: str
    kernel: Kernel
    make_args: Callable[[np.random.Generator], list]
    global_size: tuple
    local_size: tuple
    multiset: frozenset = frozenset()      # outputs compared as multisets
    tags: frozenset = field(default_factory=frozenset)


# ---- inputs -----------------------------------------------------------------------------------

def specials(t: ScalarType) -> np.ndarray:
    """16 edge values of a type (limits, zero, shift-count edges, NaN/Inf/-0/denormals)."""
    if t.is_float:
        fi = np.finfo(t.dtype)
        vals = [0.0, -0.0, 1.0, -1.0, 0.5, 3.0, -2.5, np.inf, -np.inf, np.nan,
                float(fi.smallest_subnormal), float(fi.max), -float(fi.max), 1.0 / 3.0,
                float(fi.tiny), 2.0 ** (fi.nmant + 1) + 1]
    elif t.is_signed:
        vals = [0, 1, -1, 2, -2, 7, -7, t.bits - 1, t.bits, t.bits + 1, 63, t.min, t.max,
                t.min + 1, 12345, -98765]
    else:
        vals = [0, 1, 2, 7, t.bits - 1, t.bits, t.bits + 1, 63, 64, t.max, t.max - 1,
                1 << (t.bits - 1), (1 << (t.bits - 1)) - 1, 12345, 0xDEADBEEF, 1 << 16]
    return np.array(vals, dtype=t.dtype)


def mixed(t: ScalarType, n: int, rng: np.random.Generator) -> np.ndarray:
    """n values: the specials first, then random bit patterns / normals."""
    out = np.resize(specials(t), n)
    rest = n - 16
    if rest > 0:
        if t.is_float:
            out[16:] = (rng.standard_normal(rest) * rng.choice([1e-3, 1, 1e6], rest)).astype(t.dtype)
        else:
            out[16:] = rng.integers(0, 1 << t.bits, rest, dtype=np.uint64).astype(np.uint64) \
                .view(np.int64).astype(t.dtype) if t.bits == 64 else \
                rng.integers(0, 1 << 32, rest, dtype=np.uint64).astype(np.uint32).view(
                    np.int32 if t.is_signed else np.uint32)
    return out


def pairs(t: ScalarType) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of the 16 specials: 256 lanes."""
    s = specials(t)
    return np.repeat(s, 16), np.tile(s, 16)


# ---- IR builders for generated cases ----------------------------------------------------------

def _elementwise(name: str, op: str, in_types: list[ScalarType], out: ScalarType,
                 attrs=()) -> Kernel:
    params = tuple(Value(f"in{i}", PtrType(t)) for i, t in enumerate(in_types)) + \
        (Value("out", PtrType(out)),)
    b = IRBuilder(Names(taken={p.name for p in params}))
    gid = b.op("global_id", (), i32, (("dim", 0),), hint="gid")
    loaded = [b.op("load", (p, gid), t, hint=f"x{i}") for i, (p, t) in enumerate(zip(params, in_types))]
    b.op("store", (params[-1], gid, b.op(op, tuple(loaded), out, attrs, hint="r")))
    b.return_()
    return Kernel(name, params, Block((), tuple(b.ops)))


def _int_types():
    return [SCALARS[n] for n in ("i32", "u32", "i64", "u64")]


def _float_types():
    return [f32, f64]


def generated_cases() -> list[Case]:
    cases = []
    for t in _int_types() + _float_types():
        binops = names("binary", t.kind)   # every op declared on this type gets a case
        for o in binops:
            cases.append(Case(f"{o}_{t}", _elementwise(f"{o}_{t}", o, [t, t], t),
                              lambda rng, t=t: [*pairs(t), np.zeros(256, t.dtype)], (256,), (64,),
                              tags=frozenset({"elementwise", "binary"})))
        unops = names("unary", t.kind)
        for o in unops:
            cases.append(Case(f"{o}_{t}", _elementwise(f"{o}_{t}", o, [t], t),
                              lambda rng, t=t: [mixed(t, 256, rng), np.zeros(256, t.dtype)],
                              (256,), (64,), tags=frozenset({"elementwise", "unary"})))
        for o in COMPARE:
            cases.append(Case(f"{o}_{t}", _elementwise(f"{o}_{t}", o, [t, t], boolean),
                              lambda rng, t=t: [*pairs(t), np.zeros(256, np.bool_)], (256,), (64,),
                              tags=frozenset({"elementwise", "compare"})))
    for src in _int_types() + _float_types() + [boolean]:
        for dst in _int_types() + _float_types() + [boolean]:
            if src == dst:
                continue
            def args(rng, src=src, dst=dst):
                x = (rng.integers(0, 2, 256).astype(np.bool_) if src == boolean
                     else mixed(src, 256, rng))
                if src.is_float:   # values near every integer limit
                    lims = [float(t.max) for t in _int_types()] + [float(t.min) for t in _int_types()]
                    x[16:32] = np.array(lims * 2, dtype=src.dtype)[:16]
                return [x, np.zeros(256, dst.dtype)]
            cases.append(Case(f"cast_{src}_to_{dst}", _elementwise(f"cast_{src}_{dst}", "cast", [src], dst),
                              args, (256,), (64,), tags=frozenset({"elementwise", "cast"})))
    for a, b in ((f32, u32), (u32, f32), (f32, i32), (f64, u64), (u64, f64), (f64, i64)):
        cases.append(Case(f"bitcast_{a}_to_{b}", _elementwise(f"bitcast_{a}_{b}", "bitcast", [a], b),
                          lambda rng, a=a, b=b: [mixed(a, 256, rng), np.zeros(256, b.dtype)],
                          (256,), (64,), tags=frozenset({"elementwise", "cast"})))
    for t in _float_types():
        cases.append(Case(f"fma_{t}", _elementwise(f"fma_{t}", "fma", [t, t, t], t),
                          lambda rng, t=t: [*_fma_inputs(t, rng), np.zeros(256, t.dtype)],
                          (256,), (64,), tags=frozenset({"elementwise", "fma"})))
    for t in (i32, f32):
        cases.append(Case(f"select_{t}", _elementwise(f"select_{t}", "select", [boolean, t, t], t),
                          lambda rng, t=t: [rng.integers(0, 2, 256).astype(np.bool_),
                                            mixed(t, 256, rng), mixed(t, 256, rng)[::-1].copy(),
                                            np.zeros(256, t.dtype)],
                          (256,), (64,), tags=frozenset({"elementwise"})))
    return cases


def _fma_inputs(t, rng):
    a = mixed(t, 256, rng)
    b = mixed(t, 256, rng)[::-1].copy()
    with np.errstate(over="ignore", invalid="ignore"):
        c = -(a.astype(np.float64) * b.astype(np.float64)).astype(t.dtype)  # cancellation
    c[:64] = mixed(t, 64, rng)
    return a, b, c


# ---- hand-written kernels ---------------------------------------------------------------------

@kernel
def mul_add_f32(a: Ptr[f32], b: Ptr[f32], c: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = a[i] * b[i] + c[i]   # two roundings: a lowering that fuses this fails


@kernel
def mul_add_f64(a: Ptr[f64], b: Ptr[f64], c: Ptr[f64], out: Ptr[f64]):
    i = global_id(0)
    out[i] = a[i] * b[i] + c[i]


@kernel
def vector_add(a: Ptr[f32], b: Ptr[f32], out: Ptr[f32], n: i32):
    i = global_id(0)
    if i < n:
        out[i] = a[i] + b[i]


@kernel
def divergent_flow(x: Ptr[f32], out: Ptr[f32], n: i32):
    """The paper's divergent-control-flow microbenchmark: per-lane trip counts and branches."""
    i = global_id(0)
    if i < n:
        v = x[i]
        acc = 0.0
        for k in range(i % 37):
            if (k & 1) == 0:
                acc = acc + v * f32(k)
            else:
                acc = acc - v / f32(k + 1)
        out[i] = acc


@kernel
def gemm_tiled(a: Ptr[f32], b: Ptr[f32], c: Ptr[f32], m: i32, n: i32, k: i32):
    """C = A @ B with 16x16 tiles in local memory; ragged edges are guarded."""
    ta = local_array(f32, 256)
    tb = local_array(f32, 256)
    tx = local_id(0)
    ty = local_id(1)
    col = global_id(0)
    row = global_id(1)
    acc = 0.0
    for t0 in range(0, k, 16):
        safepoint()
        ak = t0 + tx
        bk = t0 + ty
        ta[ty * 16 + tx] = a[row * k + ak] if row < m and ak < k else 0.0
        tb[ty * 16 + tx] = b[bk * n + col] if bk < k and col < n else 0.0
        barrier()
        for kk in range(16):
            acc = acc + ta[ty * 16 + kk] * tb[kk * 16 + tx]
        barrier()
    if row < m and col < n:
        c[row * n + col] = acc


@kernel
def reduce_sum(x: Ptr[f32], partial: Ptr[f32], n: i32):
    """The paper's reduction: grid-stride loads, then a tree in local memory per group."""
    buf = local_array(f32, 256)
    lid = local_id(0)
    i = global_id(0)
    acc = 0.0
    stride = local_size(0) * 64
    j = i
    while j < n:
        acc += x[j]
        j += stride
    buf[lid] = acc
    barrier()
    s = local_size(0) // 2
    while s > 0:
        if lid < s:
            buf[lid] = buf[lid] + buf[lid + s]
        barrier()
        s = s // 2
    if lid == 0:
        partial[group_id(0)] = buf[0]


@kernel
def atomic_histogram(x: Ptr[u32], bins: Ptr[i32], tickets: Ptr[i32], extremes: Ptr[u32]):
    i = global_id(0)
    v = x[i]
    atomic_add(bins, i32(v % 16), 1)
    tickets[i] = atomic_add(bins, 16, 1)
    atomic_min(extremes, 0, v)
    atomic_max(extremes, 1, v)


@kernel
def atomic_local_count(x: Ptr[i32], out: Ptr[i32]):
    counts = local_array(i32, 4)
    lid = local_id(0)
    if lid < 4:
        counts[lid] = 0
    barrier()
    atomic_add(counts, x[global_id(0)] & 3, 1)
    barrier()
    if lid < 4:
        out[group_id(0) * 4 + lid] = counts[lid]


@kernel
def atomic_exchange_cas(slots: Ptr[i32], olds: Ptr[i32], owner: Ptr[i32], seen: Ptr[i32]):
    """Order-independent by construction: every lane writes the same value to a slot."""
    i = global_id(0)
    olds[i] = atomic_xchg(slots, i % 8, i % 8 + 100)
    seen[i] = atomic_cas(owner, 0, -1, 7)


@kernel
def nested_loops(out: Ptr[i64], n: i32):
    i = global_id(0)
    acc = i64(0)
    for a in range(i % 5):
        for b in range(a, n):
            acc = acc * i64(3) + i64(a * b - i)
    out[i] = acc


@kernel
def while_collatz(x: Ptr[u32], steps: Ptr[i32]):
    i = global_id(0)
    v = x[i]
    s = 0
    while v != u32(1) and s < 1000:
        safepoint()
        v = v // u32(2) if (v & u32(1)) == u32(0) else v * u32(3) + u32(1)
        s += 1
    steps[i] = s


@kernel
def early_return(x: Ptr[i32], out: Ptr[i32], n: i32):
    i = global_id(0)
    if i >= n:
        return
    v = x[i]
    for j in range(12):
        if v > 1000:
            out[i] = j
            return
        v = v * 3 + 1
    out[i] = -1


@kernel
def grid_3d(out: Ptr[i32], sx: i32, sy: i32, sz: i32):
    x = global_id(0)
    y = global_id(1)
    z = global_id(2)
    if x < sx and y < sy and z < sz:
        out[(z * sy + y) * sx + x] = x + 1000 * y + 1000000 * z + 7 * group_id(0) + local_id(2)


@kernel
def grid_2d_ragged(a: Ptr[f32], out: Ptr[f32], w: i32, h: i32):
    x = global_id(0)
    y = global_id(1)
    if x < w and y < h:
        left = a[y * w + x - 1] if x > 0 else 0.0
        right = a[y * w + x + 1] if x + 1 < w else 0.0
        out[y * w + x] = (left + right) * 0.5 - a[y * w + x]


@kernel
def loop_carried_swap(out: Ptr[i32], n: i32):
    i = global_id(0)
    a = i
    b = 1
    for k in range(n):
        t = a
        a = b
        b = t + b * k
    out[i] = a - b


@kernel
def float_specials_mix(x: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    v = x[i]
    out[i] = min(v, 0.0) + max(v * v, -v) - sqrt(abs(v)) / (v - 1.0)


@kernel
def bit_length_hash(x: Ptr[u32], wide: Ptr[i64], out: Ptr[i32]):
    i = global_id(0)
    v = x[i]
    width = 32 - clz(v)                                 # bit length: clz(0) is 32
    out[i] = i32(width) * 100 + i32(popcount(v ^ (v >> 3))) + i32(clz(wide[i]) - popcount(wide[i]))


def _vadd_args(n):
    def make(rng):
        return [rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32),
                np.zeros(n, np.float32), np.int32(n)]
    return make


def handwritten_cases() -> list[Case]:
    big = 1 << 24  # 64 MiB per f32 buffer
    return [
        Case("mul_add_f32_unfused", mul_add_f32.kernel,
             lambda rng: [*_fma_inputs(f32, rng), np.zeros(256, np.float32)], (256,), (64,),
             tags=frozenset({"elementwise", "fma"})),
        Case("mul_add_f64_unfused", mul_add_f64.kernel,
             lambda rng: [*_fma_inputs(f64, rng), np.zeros(256, np.float64)], (256,), (64,),
             tags=frozenset({"elementwise", "fma"})),
        Case("micro_vector_add", vector_add.kernel, _vadd_args(100_000), (100_096,), (128,),
             tags=frozenset({"elementwise", "micro"})),
        Case("large_vector_add_64MiB", vector_add.kernel, _vadd_args(big), (big,), (256,),
             tags=frozenset({"elementwise", "large"})),
        Case("micro_divergent_flow", divergent_flow.kernel,
             lambda rng: [rng.standard_normal(4000).astype(np.float32), np.zeros(4000, np.float32),
                          np.int32(4000)], (4096,), (64,), tags=frozenset({"divergent", "micro"})),
        Case("micro_gemm_ragged_70x50x33", gemm_tiled.kernel,
             lambda rng: [rng.standard_normal(70 * 33).astype(np.float32),
                          rng.standard_normal(33 * 50).astype(np.float32),
                          np.zeros(70 * 50, np.float32), np.int32(70), np.int32(50), np.int32(33)],
             (64, 80), (16, 16), tags=frozenset({"gemm", "barrier", "micro"})),
        Case("micro_gemm_128", gemm_tiled.kernel,
             lambda rng: [rng.standard_normal(128 * 128).astype(np.float32),
                          rng.standard_normal(128 * 128).astype(np.float32),
                          np.zeros(128 * 128, np.float32), np.int32(128), np.int32(128), np.int32(128)],
             (128, 128), (16, 16), tags=frozenset({"gemm", "barrier", "micro"})),
        Case("micro_reduction", reduce_sum.kernel,
             lambda rng: [rng.standard_normal(1_000_000).astype(np.float32),
                          np.zeros(64, np.float32), np.int32(1_000_000)],
             (256 * 64,), (256,), tags=frozenset({"reduction", "barrier", "micro"})),
        Case("atomic_histogram_global", atomic_histogram.kernel,
             lambda rng: [rng.integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32),
                          np.zeros(17, np.int32), np.zeros(4096, np.int32),
                          np.array([0xFFFFFFFF, 0], np.uint32)],
             (4096,), (128,), multiset=frozenset({"tickets"}), tags=frozenset({"atomic"})),
        Case("atomic_local_memory", atomic_local_count.kernel,
             lambda rng: [rng.integers(-1000, 1000, 1024).astype(np.int32), np.zeros(64, np.int32)],
             (1024,), (64,), tags=frozenset({"atomic", "barrier"})),
        Case("atomic_xchg_cas", atomic_exchange_cas.kernel,
             lambda rng: [np.full(8, -1, np.int32), np.zeros(512, np.int32), np.array([-1], np.int32),
                          np.zeros(512, np.int32)],
             (512,), (64,), multiset=frozenset({"olds", "seen"}), tags=frozenset({"atomic"})),
        Case("nested_loops_i64", nested_loops.kernel,
             lambda rng: [np.zeros(200, np.int64), np.int32(23)], (200,), (40,),
             tags=frozenset({"loops"})),
        Case("while_collatz_u32", while_collatz.kernel,
             lambda rng: [np.concatenate([np.arange(1, 257), rng.integers(1, 1 << 31, 256)]).astype(np.uint32),
                          np.zeros(512, np.int32)], (512,), (64,),
             tags=frozenset({"loops", "divergent"})),
        Case("early_return_in_loop", early_return.kernel,
             lambda rng: [rng.integers(-50, 5000, 300).astype(np.int32), np.zeros(300, np.int32),
                          np.int32(300)], (320,), (32,), tags=frozenset({"divergent"})),
        Case("grid_3d_ragged", grid_3d.kernel,
             lambda rng: [np.zeros(13 * 7 * 5, np.int32), np.int32(13), np.int32(7), np.int32(5)],
             (16, 8, 6), (4, 2, 3), tags=frozenset({"grid"})),
        Case("grid_2d_ragged_stencil", grid_2d_ragged.kernel,
             lambda rng: [rng.standard_normal(37 * 29).astype(np.float32),
                          np.zeros(37 * 29, np.float32), np.int32(37), np.int32(29)],
             (48, 32), (16, 8), tags=frozenset({"grid"})),
        Case("loop_carried_swap", loop_carried_swap.kernel,
             lambda rng: [np.zeros(64, np.int32), np.int32(40)], (64,), (64,),
             tags=frozenset({"loops"})),
        Case("bit_length_hash", bit_length_hash.kernel,
             lambda rng: [mixed(u32, 256, rng), mixed(i64, 256, rng), np.zeros(256, np.int32)],
             (256,), (64,), tags=frozenset({"elementwise", "bits"})),
        Case("float_specials_mix", float_specials_mix.kernel,
             lambda rng: [mixed(f32, 256, rng), np.zeros(256, np.float32)], (256,), (64,),
             tags=frozenset({"elementwise"})),
    ]


def all_cases() -> list[Case]:
    return generated_cases() + handwritten_cases()

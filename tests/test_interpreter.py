"""The reference interpreter against hand-computed results of docs/semantics.md."""
import numpy as np
import pytest

from concordia import (Ptr, Runtime, atomic_add, atomic_cas, atomic_max, atomic_min,
                          atomic_xchg, barrier, f32, f64, fma, global_id, i32, i64, kernel,
                          local_array, local_id, local_size, group_id, sqrt, u32, KernelRuntimeError)


@pytest.fixture
def rt():
    return Runtime("reference")


def run1(rt, k, inputs, out_dtype, n=None, local=None, extra=()):
    n = n or len(inputs[0])
    bufs = [rt.to_device(np.asarray(a)) for a in inputs]
    out = rt.zeros(n, out_dtype)
    rt.launch(k, global_size=n, local_size=local or min(n, 64), args=(*bufs, out, *extra))
    return out.numpy()


@kernel
def add_i32(a: Ptr[i32], b: Ptr[i32], out: Ptr[i32]):
    i = global_id(0)
    out[i] = a[i] + b[i]


@kernel
def mul_i32(a: Ptr[i32], b: Ptr[i32], out: Ptr[i32]):
    i = global_id(0)
    out[i] = a[i] * b[i]


@kernel
def div_i32(a: Ptr[i32], b: Ptr[i32], out: Ptr[i32]):
    i = global_id(0)
    out[i] = a[i] // b[i]


@kernel
def rem_i32(a: Ptr[i32], b: Ptr[i32], out: Ptr[i32]):
    i = global_id(0)
    out[i] = a[i] % b[i]


@kernel
def div_u32(a: Ptr[u32], b: Ptr[u32], out: Ptr[u32]):
    i = global_id(0)
    out[i] = a[i] // b[i]


@kernel
def shifts(a: Ptr[i32], b: Ptr[i32], out: Ptr[i32]):
    i = global_id(0)
    out[i] = (a[i] << b[i]) ^ (a[i] >> b[i])


@kernel
def shr_u32(a: Ptr[u32], b: Ptr[u32], out: Ptr[u32]):
    i = global_id(0)
    out[i] = a[i] >> b[i]


@kernel
def f_to_i(a: Ptr[f32], out: Ptr[i32]):
    i = global_id(0)
    out[i] = i32(a[i])


@kernel
def f_to_u(a: Ptr[f32], out: Ptr[u32]):
    i = global_id(0)
    out[i] = u32(a[i])


@kernel
def fmin_k(a: Ptr[f32], b: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = min(a[i], b[i])


@kernel
def fma_k(a: Ptr[f32], b: Ptr[f32], c: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = fma(a[i], b[i], c[i])


@kernel
def mul_add_k(a: Ptr[f32], b: Ptr[f32], c: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = a[i] * b[i] + c[i]


I32_MIN, I32_MAX = -2**31, 2**31 - 1


def test_int_wraparound(rt):
    a = np.array([I32_MAX, I32_MIN, -1, 7], np.int32)
    b = np.array([1, -1, 1, -9], np.int32)
    assert run1(rt, add_i32, [a, b], np.int32).tolist() == [I32_MIN, I32_MAX, 0, -2]
    a = np.array([65536, I32_MIN, 3], np.int32)
    b = np.array([65536, -1, -5], np.int32)
    assert run1(rt, mul_i32, [a, b], np.int32).tolist() == [0, I32_MIN, -15]


def test_signed_division_edges(rt):
    a = np.array([7, -7, 7, -7, 5, I32_MIN, I32_MIN, 0], np.int32)
    b = np.array([2, 2, -2, -2, 0, -1, 0, 0], np.int32)
    assert run1(rt, div_i32, [a, b], np.int32).tolist() == [3, -3, -3, 3, -1, I32_MIN, -1, -1]
    assert run1(rt, rem_i32, [a, b], np.int32).tolist() == [1, -1, 1, -1, 5, 0, I32_MIN, 0]


def test_unsigned_division_by_zero(rt):
    a = np.array([7, 0xFFFFFFFF, 9], np.uint32)
    b = np.array([0, 2, 4], np.uint32)
    assert run1(rt, div_u32, [a, b], np.uint32).tolist() == [0xFFFFFFFF, 0x7FFFFFFF, 2]


def test_shift_counts_are_masked(rt):
    a = np.array([1, -8, 3, -1], np.int32)
    b = np.array([33, 1, 32, -1], np.int32)   # 33 -> 1, 32 -> 0, -1 -> 31
    expect = [(1 << 1) ^ (1 >> 1), (-16) ^ (-4), 3 ^ 3, I32_MIN ^ -1]
    assert run1(rt, shifts, [a, b], np.int32).tolist() == expect
    u = np.array([0x80000000, 0x80000000], np.uint32)
    assert run1(rt, shr_u32, [u, np.array([31, 63], np.uint32)], np.uint32).tolist() == [1, 1]


def test_float_to_int_saturates(rt):
    a = np.array([np.nan, np.inf, -np.inf, 3e9, -3e9, -2.7, 2.7, -2147483648.0], np.float32)
    assert run1(rt, f_to_i, [a], np.int32).tolist() == [0, I32_MAX, I32_MIN, I32_MAX, I32_MIN,
                                                         -2, 2, I32_MIN]
    assert run1(rt, f_to_u, [a], np.uint32).tolist() == [0, 2**32 - 1, 0, 3000000000, 0, 0, 2, 0]


def test_float_min_nan_and_signed_zero(rt):
    a = np.array([np.nan, 1.0, -0.0, 0.0, -np.inf], np.float32)
    b = np.array([2.0, np.nan, 0.0, -0.0, np.nan], np.float32)
    out = run1(rt, fmin_k, [a, b], np.float32)
    assert out[:2].tolist() == [2.0, 1.0]
    assert np.signbit(out[2]) and not np.signbit(out[3])   # equal: first operand
    assert out[4] == -np.inf


def test_fma_is_single_rounding_and_mul_add_is_not():
    rt = Runtime("reference")
    # (1 + 2^-23) * (1 - 2^-23) = 1 - 2^-46: fused keeps the -2^-46, unfused rounds it to 1.
    a = np.array([1 + 2**-23], np.float32)
    b = np.array([1 - 2**-23], np.float32)
    c = np.array([-1.0], np.float32)
    assert run1(rt, fma_k, [a, b, c], np.float32)[0] == np.float32(-2.0**-46)
    assert run1(rt, mul_add_k, [a, b, c], np.float32)[0] == 0.0


def _round_to_f32(exact):
    """Correctly rounded f32 of an exact rational: the nearest of three candidates, ties to even."""
    from fractions import Fraction
    f = np.float32(float(exact))
    cands = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    def key(c):
        return (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.uint32)) & 1)
    return min((c for c in cands if np.isfinite(c)), key=key)


def test_fma32_matches_exact_rounding_on_random_inputs():
    from fractions import Fraction
    from concordia_ir.interpreter import fma32
    rng = np.random.default_rng(1)
    scale = lambda: rng.choice(np.array([1e-20, 1, 1e15], np.float32), 3000)
    a, b, c = (rng.standard_normal(3000).astype(np.float32) * scale() for _ in range(3))
    # near-cancellation cases, where double rounding would show
    c[:1000] = -(a[:1000].astype(np.float64) * b[:1000]).astype(np.float32)
    got = fma32(a, b, c)
    for x, y, z, g in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        assert g == _round_to_f32(exact), (x, y, z)


@kernel
def sqrt_div(a: Ptr[f32], b: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = sqrt(a[i]) / b[i]


def test_ieee_specials(rt):
    a = np.array([4.0, -1.0, np.inf, -0.0, 1.0, 0.0], np.float32)
    b = np.array([2.0, 1.0, np.inf, 1.0, 0.0, 0.0], np.float32)
    out = run1(rt, sqrt_div, [a, b], np.float32)
    assert out[0] == 1.0 and np.isnan(out[1]) and np.isnan(out[2])
    assert out[3] == 0.0 and np.signbit(out[3]) and out[4] == np.inf and np.isnan(out[5])


@kernel
def denormal_k(a: Ptr[f32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = a[i] * 0.5


def test_denormals_are_kept(rt):
    tiny = np.array([np.finfo(np.float32).smallest_subnormal * 4], np.float32)
    assert run1(rt, denormal_k, [tiny], np.float32)[0] == tiny[0] / 2


@kernel
def group_sum(x: Ptr[f32], out: Ptr[f32]):
    buf = local_array(f32, 64)
    lid = local_id(0)
    buf[lid] = x[global_id(0)]
    barrier()
    s = local_size(0) // 2
    while s > 0:
        if lid < s:
            buf[lid] = buf[lid] + buf[lid + s]
        barrier()
        s = s // 2
    if lid == 0:
        out[group_id(0)] = buf[0]


def test_barrier_and_local_memory_tree_reduction(rt):
    x = np.arange(256, dtype=np.float32)
    out = rt.zeros(4, np.float32)
    rt.launch(group_sum, global_size=256, local_size=64, args=(rt.to_device(x), out))
    assert out.numpy().tolist() == [x[i * 64:(i + 1) * 64].sum() for i in range(4)]


@kernel
def atomics_k(counter: Ptr[i32], olds: Ptr[i32], mn: Ptr[i32], mx: Ptr[i32], xs: Ptr[i32]):
    i = global_id(0)
    olds[i] = atomic_add(counter, 0, 1)
    atomic_min(mn, 0, xs[i])
    atomic_max(mx, 0, xs[i])


def test_atomics_count_and_extremes(rt):
    n = 200
    xs = np.random.default_rng(0).integers(-1000, 1000, n).astype(np.int32)
    counter, olds = rt.zeros(1, np.int32), rt.zeros(n, np.int32)
    mn, mx = rt.to_device(np.array([10**6], np.int32)), rt.to_device(np.array([-10**6], np.int32))
    rt.launch(atomics_k, global_size=n, local_size=40, args=(counter, olds, mn, mx, rt.to_device(xs)))
    assert counter.numpy()[0] == n
    assert sorted(olds.numpy().tolist()) == list(range(n))   # each ticket handed out once
    assert mn.numpy()[0] == xs.min() and mx.numpy()[0] == xs.max()


@kernel
def cas_lock(slot: Ptr[i32], winners: Ptr[i32]):
    i = global_id(0)
    old = atomic_cas(slot, 0, -1, i)
    if old == -1:
        winners[0] = atomic_xchg(winners, 1, i) + 1


def test_cas_has_exactly_one_winner(rt):
    slot, winners = rt.to_device(np.array([-1], np.int32)), rt.zeros(2, np.int32)
    rt.launch(cas_lock, global_size=128, local_size=32, args=(slot, winners))
    w = slot.numpy()[0]
    assert 0 <= w < 128 and winners.numpy().tolist() == [1, w]


@kernel
def divergent_loop(n: Ptr[i32], out: Ptr[i64]):
    i = global_id(0)
    acc = i64(0)
    k = 0
    while k < n[i]:
        acc += i64(k) * i64(k)
        k += 1
    for j in range(i, 0, -1):
        acc += i64(j)
    out[i] = acc


def test_divergent_trip_counts(rt):
    n = np.array([0, 1, 5, 100, 3, 0, 7, 2], np.int32)
    out = run1(rt, divergent_loop, [n], np.int64)
    want = [sum(k * k for k in range(n[i])) + sum(range(1, i + 1)) for i in range(8)]
    assert out.tolist() == want


@kernel
def early_exit(x: Ptr[i32], out: Ptr[i32], n: i32):
    i = global_id(0)
    if i >= n:
        return
    v = x[i]
    for j in range(10):
        if v > 100:
            out[i] = j
            return
        v = v * 2
    out[i] = -1


def test_early_return_in_loops_and_bounds(rt):
    x = np.array([1, 60, 101, 0], np.int32)
    out = rt.zeros(4, np.int32)
    rt.launch(early_exit, global_size=64, local_size=64, args=(rt.to_device(x), out, 4))
    assert out.numpy().tolist() == [7, 1, 0, -1]


@kernel
def nested(out: Ptr[f64], n: i32):
    i = global_id(0)
    acc = 0.0
    s = f64(0)
    for a in range(n):
        for b in range(a):
            s = s + f64(a * b)
        acc = acc + 1.0
    out[i] = s + f64(acc)


def test_nested_loops_with_carried_values(rt):
    out = rt.zeros(2, np.float64)
    rt.launch(nested, global_size=2, local_size=2, args=(out, 6))
    want = sum(a * b for a in range(6) for b in range(a)) + 6
    assert out.numpy().tolist() == [want, want]


@kernel
def oob(x: Ptr[f32]):
    x[global_id(0) + 1] = 1.0


def test_out_of_bounds_is_reported_with_line(rt):
    with pytest.raises(KernelRuntimeError, match=r"test_interpreter.py:\d+: kernel 'oob': store "
                                                 r"out of bounds: index 4 .* of 4 elements"):
        rt.launch(oob, global_size=4, local_size=4, args=(rt.zeros(4, np.float32),))


@kernel
def grid2d(out: Ptr[i32], w: i32):
    x = global_id(0)
    y = global_id(1)
    out[y * w + x] = x * 100 + y


def test_2d_grid_ids(rt):
    out = rt.zeros(6 * 4, np.int32)
    rt.launch(grid2d, global_size=(6, 4), local_size=(3, 2), args=(out, 6))
    got = out.numpy().reshape(4, 6)
    assert all(got[y, x] == x * 100 + y for y in range(4) for x in range(6))


def test_chunked_launch_equals_single_chunk():
    from concordia_ir.interpreter import Interpreter
    x = np.arange(256, dtype=np.float32)
    outs = []
    for lanes in (64, 1 << 20):
        out = np.zeros(4, np.float32)
        Interpreter(group_sum.kernel).run([x, out], (256, 1, 1), (64, 1, 1), max_lanes=lanes)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1])


def test_f64_and_casts(rt):
    @kernel
    def k(a: Ptr[f64], out: Ptr[f32]):
        i = global_id(0)
        out[i] = f32(a[i])
    a = np.array([1e300, 0.1, -1e-50], np.float64)
    out = run1(rt, k, [a], np.float32)
    assert out[0] == np.inf and out[1] == np.float32(0.1) and out[2] == 0.0 and np.signbit(out[2])

"""A handler's virtual groups inlined several at a time with their stores deferred
(handlers/deferred_stores.py): which handlers qualify, and, on every backend here, the same
results as the reference's arithmetic in numpy, with tails of fewer groups than the unroll."""
from collections import Counter

import numpy as np
import pytest

from concordia import Ptr, Runtime, f32, global_id, i32, kernel, select
from concordia.backends import backend_status
from concordia.handlers.deferred_stores import deferrable, sinkable
from concordia.handlers.dispatcher import _body_ops
from concordia.handlers.persistent import PersistentRuntime, build_dispatcher, make_handler
from concordia.lowering import render_source
from concordia_ir.errors import ConcordiaError
from concordia_ir.ops import Block, walk
from concordia.lowering.compile import compile_cuda, compile_hip
from tests.bench_usage import usage_error
from tests.test_lowering import elf_header, needs_clang, needs_nvrtc
from tests.test_persistent import RING_BACKENDS, axpy, expected_axpy, tick

STATUS = backend_status()
BLOCK = 32


@kernel
def branchy(x: Ptr[f32], pos: Ptr[f32], neg: Ptr[f32], absv: Ptr[f32], n: i32):
    """Stores in both branches and in a nested if, and an if that also yields a value (s)."""
    i = global_id(0)
    if i < n:
        v = x[i]
        if v > 0.0:
            pos[i] = v
            if v > 2.0:
                neg[i] = 0.0 - v
            s = v
        else:
            neg[i] = v * 2.0
            s = 0.0 - v
        absv[i] = s + 1.0


@kernel
def window(x: Ptr[f32], out: Ptr[f32], w: i32, n: i32):
    i = global_id(0)
    if i < n:
        s = 0.0
        for j in range(w):
            s = s + x[i + j]
        out[i] = s


@kernel
def clip(x: Ptr[f32], out: Ptr[f32], k: i32, n: i32):
    """A sunk select whose condition does not sink: the store is handed a bool."""
    i = global_id(0)
    if i < n:
        c = i < k
        out[i] = select(c, x[i] * 2.0, 0.0)


@kernel
def bump(c: Ptr[i32], n: i32):
    i = global_id(0)
    if i < n:
        c[i] = c[i] + 1


@kernel
def bump_next(c: Ptr[i32], n: i32):
    i = global_id(0)
    if i < n:
        c[i + 1] = c[i] + 1


@kernel
def store_then_load(c: Ptr[i32], out: Ptr[i32], n: i32):
    i = global_id(0)
    if i < n:
        c[i] = 5
        out[i] = c[i]


@kernel
def store_in_loop(x: Ptr[f32], out: Ptr[f32], n: i32):
    i = global_id(0)
    for j in range(2):
        if i < n:
            out[2 * i + j] = x[i]


def may_defer(fn, buffers) -> bool:
    return deferrable(make_handler("h", fn, list(buffers)).kernel, tuple(buffers))


def test_which_handlers_may_defer_their_stores():
    rt = Runtime("reference")
    x, y, c = rt.zeros(64, np.float32), rt.zeros(64, np.float32), rt.zeros(64, np.int32)
    assert may_defer(axpy, (x, y))
    assert may_defer(branchy, (x, y, rt.zeros(64, np.float32), rt.zeros(64, np.float32)))
    assert may_defer(window, (x, y))
    assert not may_defer(axpy, (x, x))                 # one buffer loaded and stored
    assert not may_defer(axpy, (x, x.part(8, 16)))     # a part of it: the same memory
    assert not may_defer(axpy, (x.view(np.float32), x))
    assert may_defer(bump, (c,))                       # reads what it writes, its own element
    assert not may_defer(bump_next, (c,))              # another group's element
    assert not may_defer(store_then_load, (c, rt.zeros(64, np.int32)))   # a load after a store
    assert not may_defer(tick, (c,))                   # an atomic
    assert not may_defer(store_in_loop, (x, y))        # a store that runs twice a group


def test_a_deferring_dispatcher_issues_its_loads_first_and_lowers_everywhere():
    rt = Runtime("reference")
    x, y = rt.zeros(64, np.float32), rt.zeros(64, np.float32)
    k = build_dispatcher([make_handler("a", axpy, [x, y]), make_handler("t", tick, [rt.zeros(4, np.int32)])],
                         64, defer=4)
    cuda = render_source(k, "cuda")
    body = cuda[cuda.index("h0_cc_group0"):]
    loads = [body.index(f"h0_x[h0_u{u}_i]") for u in range(4)]
    assert max(loads) < body.index("h0_out[")          # the 4 groups' loads before any store
    # and before the first use of one: a * x[i] + b is computed with its store
    assert max(loads) < body.index("(h0_a * ")
    assert "h0_cc_group0" in cuda and "h1_cc_group0" not in cuda   # tick does not defer
    for target in ("opencl", "hip"):
        assert "h0_u3_" in render_source(k, target)


def test_a_stored_expression_on_a_load_waits_for_its_store():
    """Only what computes a stored value from a loaded one, each used once, is left for the
    store: branchy's 0 - v, v * 2 and s + 1 (s an if's result) with their constants; not its
    compares (an if's condition) nor the 0 - v that the if yields."""
    rt = Runtime("reference")
    h = make_handler("branchy", branchy, [rt.zeros(4, np.float32) for _ in range(4)])
    body = _body_ops(h.kernel)
    sunk = sinkable(body)
    assert Counter(op.name for op in walk(Block((), body)) if id(op) in sunk) == Counter(
        {"const": 3, "sub": 1, "mul": 1, "add": 1})
    w = make_handler("window", window, [rt.zeros(4, np.float32) for _ in range(2)])
    assert sinkable(_body_ops(w.kernel)) == frozenset()   # it stores its loop's result


@pytest.mark.parametrize("defer", [3, 4])
@pytest.mark.parametrize("backend", RING_BACKENDS)
def test_deferred_stores_give_the_same_results(backend, defer):
    rt = Runtime(backend)
    rng = np.random.default_rng(defer)
    n_max = 9 * BLOCK
    xs = rng.uniform(-4, 4, n_max + 8).astype(np.float32)
    x = rt.to_device(xs)
    # outputs start at 7: a store made where the handler makes none shows
    pos, neg, win, out, absv, clipped = (rt.to_device(np.full(n_max, 7, np.float32))
                                         for _ in range(6))
    counts = rt.zeros(n_max, np.int32)
    pr = PersistentRuntime(rt, blocks=2, block_size=BLOCK, ring_slots=32, watchdog_s=60,
                           defer_stores=defer)
    pr.register_many([("branchy", branchy, [x, pos, neg, absv]), ("window", window, [x, win]),
                      ("axpy", axpy, [x, out]), ("bump", bump, [counts]),
                      ("clip", clip, [x, clipped])])
    pr.start()
    sizes = [int(v) for v in rng.integers(1, n_max + 1, 12)] + [n_max]
    for n in sizes:
        groups, split = -(-n // BLOCK), int(rng.choice([1, 2, 5, 9]))
        pr.submit("branchy", groups, (n,), split)
        pr.submit("window", groups, (3, n), split)
        pr.submit("axpy", groups, (1.5, -0.25, 0, n), split)
        pr.submit("bump", groups, (n,), split)
        pr.submit("clip", groups, (n_max // 2, n), split)
    pr.wait()
    assert pr.shutdown() == []
    v = xs[:n_max]
    assert np.array_equal(pos.numpy(), np.where(v > 0, v, 7).astype(np.float32))
    want_neg = np.where(v > 2, np.float32(0) - v, np.where(v > 0, 7, v * np.float32(2)))
    assert np.array_equal(neg.numpy(), want_neg.astype(np.float32))
    assert np.array_equal(absv.numpy(), np.abs(v) + np.float32(1))
    want_win = (xs[:n_max] + xs[1:n_max + 1]) + xs[2:n_max + 2]
    assert np.array_equal(win.numpy(), want_win)
    assert np.array_equal(out.numpy(), expected_axpy(xs, 1.5, -0.25, n_max))
    assert np.array_equal(counts.numpy(), (np.arange(n_max)[:, None] < np.array(sizes)).sum(1))
    # every task writes the same values where it writes (tasks of one op may overlap in time)
    half = np.arange(n_max) < n_max // 2
    assert np.array_equal(clipped.numpy(), np.where(half, v * np.float32(2), 0).astype(np.float32))


def test_defer_stores_out_of_range_is_one_line():
    with pytest.raises(ConcordiaError, match=r"^defer_stores must be 1 to 16 .*got 0$"):
        PersistentRuntime(Runtime("reference"), defer_stores=0)


@pytest.mark.parametrize("script, flag", [("dispatch.py", "--defer-stores"),
                                          ("dispatch_sass.py", "--defer")])
def test_the_benchmarks_refuse_a_bad_unroll_in_one_line(script, flag):
    assert f"{flag} must be 1 to 16, got 0" in usage_error(script, flag, "0", timeout=120)


def _deferring_dispatcher():
    rt = Runtime("reference")
    x, y, z, w = (rt.zeros(64, np.float32) for _ in range(4))
    c = rt.zeros(64, np.int32)
    return build_dispatcher([make_handler("branchy", branchy, [x, y, z, w]),
                             make_handler("window", window, [x, y]),
                             make_handler("bump", bump, [c])], 64, defer=4)


@needs_nvrtc
def test_a_deferring_dispatcher_compiles_for_cuda():
    ptx = compile_cuda(render_source(_deferring_dispatcher(), "cuda"), "compute_90").decode()
    assert "fence.sc.sys" in ptx or "membar.sys" in ptx


@needs_clang
def test_a_deferring_dispatcher_compiles_for_gfx1201():
    co = compile_hip(render_source(_deferring_dispatcher(), "hip"), "gfx1201")
    assert elf_header(co)[:2] == (3, 224)   # ET_DYN, EM_AMDGPU


@pytest.mark.parametrize("args, message", [
    (["--defer-stores", "1,x"], "--defer-stores must be 1 to 16, got 1,x"),
    (["--defer-stores", "1,8", "--phases"], "--phases takes one --defer-stores value")])
def test_the_dispatch_benchmark_refuses_a_bad_unroll_list_in_one_line(args, message):
    assert message in usage_error("dispatch.py", *args, timeout=120)

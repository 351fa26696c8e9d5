"""The persistent-kernel runtime on the backends this machine has: a task ring in host-mapped
memory, an op table of IR handlers, hot-swaps between tasks, the watchdog. On the GPU machine
the same tests run on cuda, and a million-task run with random hot-swaps (marked gpu)."""
import dataclasses
import random

import numpy as np
import pytest

from concordia.backends import backend_status
from concordia import Ptr, Runtime, atomic_add, f32, global_id, i32, i64, kernel
from concordia_ir.errors import ConcordiaError
from concordia_ir.ops import Block, Kernel
from concordia.handlers.persistent import PersistentRuntime, TaskError, build_dispatcher, make_handler
from concordia.lowering import render_source
from tests.bench_usage import usage_error

STATUS = backend_status()
RING_BACKENDS = [b for b in ("reference", "opencl", "tenstorrent-scalar-host", "cuda")
                 if STATUS[b].ok and (b != "opencl" or not STATUS[b].gpu)]


@kernel
def axpy(x: Ptr[f32], out: Ptr[f32], a: f32, b: f32, base: i32, n: i32):
    i = global_id(0)
    if i < n:
        out[base + i] = a * x[i] + b


@kernel
def axmy(x: Ptr[f32], out: Ptr[f32], a: f32, b: f32, base: i32, n: i32):
    i = global_id(0)
    if i < n:
        out[base + i] = a * x[i] - b


@kernel
def tick(counts: Ptr[i32], task: i32, wide: i64):
    if global_id(0) == 0:
        atomic_add(counts, task, i32(wide - i64(4000000000)))


@kernel
def hang(gate: Ptr[i32], out: Ptr[i32]):
    while gate[0] == 0:
        pass
    out[0] = 1


@kernel
def returns_early(x: Ptr[f32]):
    if global_id(0) > 3:
        return
    x[global_id(0)] = 1.0


def volatile_loads(k: Kernel) -> Kernel:
    """The same kernel with every load volatile (the frontend has no syntax for it)."""
    def block(b: Block) -> Block:
        return Block(b.args, tuple(
            dataclasses.replace(op, attrs=op.attrs + (("volatile", 1),) if op.name == "load" else op.attrs,
                                regions=tuple(block(r) for r in op.regions)) for op in b.ops))
    return dataclasses.replace(k, body=block(k.body))


def expected_axpy(x, a, b, n, minus=False):
    ax = np.float32(a) * x[:n]
    return (ax - np.float32(b)) if minus else (ax + np.float32(b))


@pytest.mark.parametrize("backend", RING_BACKENDS)
def test_mixed_tasks_with_hot_swaps_run_exactly_once(backend):
    rt = Runtime(backend)
    rng = random.Random(7)
    n_tasks = 400
    x = rt.to_device(np.arange(300, dtype=np.float32) * np.float32(0.25))
    out = rt.zeros(300 * n_tasks, np.float32)
    counts = rt.zeros(n_tasks, np.int32)
    pr = PersistentRuntime(rt, blocks=2, block_size=64, ring_slots=32, watchdog_s=60)
    pr.register("axpy", axpy, [x, out])
    pr.register("tick", tick, [counts])
    pr.start()
    minus, plan = False, []
    for k in range(n_tasks):
        if rng.random() < 0.02:                        # hot-swap: axpy <-> axmy, same name
            minus = not minus
            stats = pr.register("axpy", axmy if minus else axpy, [x, out])
            assert stats.pause_s >= 0 and stats.compile_s > 0
        a, b, n = rng.uniform(-2, 2), rng.uniform(-5, 5), rng.randint(1, 300)
        pr.submit("axpy", groups=-(-n // 64), args=(a, b, 300 * k, n), split=rng.choice([1, 2, 8]))
        pr.submit("tick", groups=1, args=(k, 4000000001))
        plan.append((a, b, n, minus))
    pr.wait()
    assert pr.shutdown() == []
    assert pr.swaps, "the random plan made no hot-swap"
    assert np.array_equal(counts.numpy(), np.ones(n_tasks, np.int32))   # each task once
    got = out.numpy().reshape(n_tasks, 300)
    xs = np.arange(300, dtype=np.float32) * np.float32(0.25)
    for k, (a, b, n, m) in enumerate(plan):
        assert np.array_equal(got[k, :n], expected_axpy(xs, a, b, n, m)), k
        assert not got[k, n:].any()


@pytest.mark.parametrize("backend", [b for b in RING_BACKENDS if b in ("reference", "opencl", "cuda")])
def test_watchdog_reports_a_hung_task_and_returns_the_pending_ones(backend):
    rt = Runtime(backend)
    gate = rt.mapped(1, np.int32)                      # the host releases the hung task
    flag = rt.zeros(1, np.int32)
    counts = rt.zeros(8, np.int32)
    pr = PersistentRuntime(rt, blocks=1, block_size=32, ring_slots=8, watchdog_s=60)
    pr.register("hang", volatile_loads(hang.kernel), [gate, flag])
    pr.register("tick", tick, [counts])
    pr.start()
    pr.submit("tick", groups=1, args=(0, 4000000001))
    pr.wait()
    stuck = pr.submit("hang", groups=1)
    after = pr.submit("tick", groups=1, args=(1, 4000000001))
    with pytest.raises(TaskError, match=r"watchdog: task \d+ \(hang, groups 0\+1\) did not complete") as e:
        pr.wait(timeout=1.0)
    assert [t.seq for t in e.value.pending] == [stuck[0].seq, after[0].seq]
    assert [t.groups for t in e.value.pending] == [(0, 1, 1), (0, 1, 1)]
    with pytest.raises(ConcordiaError, match="has failed"):
        pr.submit("tick", groups=1, args=(2, 4000000001))
    gate.host[0] = 1                   # released: the hung task ends; no other task starts
    returned = {t.seq for t in pr.shutdown()}
    assert pr.running is None
    assert returned == {after[0].seq}
    # the returned task never ran: the caller may resubmit it without doubling it
    assert counts.numpy()[1] == 0 and flag.numpy()[0] == 1


def test_handlers_are_checked_when_registered():
    rt = Runtime("reference")
    x = rt.zeros(8, np.float32)
    with pytest.raises(ConcordiaError, match="early return; an op-table handler runs to its end"):
        make_handler("r", returns_early, [x])
    with pytest.raises(ConcordiaError, match="has 2 buffer parameters"):
        make_handler("a", axpy, [x])
    with pytest.raises(ConcordiaError, match="needs a device buffer of i32"):
        make_handler("t", tick, [x])
    pr = PersistentRuntime(rt, blocks=1, block_size=32, ring_slots=4)
    with pytest.raises(ConcordiaError, match="register at least one handler"):
        pr.start()
    pr.register("tick", tick, [rt.zeros(4, np.int32)])
    with pytest.raises(ConcordiaError, match="takes 2 scalar arguments"):
        pr.submit("tick", groups=1, args=(1,))
    with pytest.raises(ConcordiaError, match="no handler 'nope'"):
        pr.submit("nope", groups=1)


def test_dispatcher_lowers_for_every_gpu_target():
    from concordia.lowering import render_source
    rt = Runtime("reference")
    x, out, c = rt.zeros(8, np.float32), rt.zeros(8, np.float32), rt.zeros(8, np.int32)
    k = build_dispatcher([make_handler("axpy", axpy, [x, out]), make_handler("tick", tick, [c])], 64)
    cuda = render_source(k, "cuda")
    assert "__threadfence_system();" in cuda and "volatile" in cuda and "atomicAdd" in cuda
    assert "mem_fence(CLK_GLOBAL_MEM_FENCE);" in render_source(k, "opencl")
    try:
        from concordia.lowering.compile import compile_cuda
        ptx = compile_cuda(cuda, "compute_90", emit="ptx").decode()
    except ConcordiaError as e:
        pytest.skip(f"NVRTC: {e}")
    assert "membar.sys" in ptx or "fence.sc.sys" in ptx
    assert "ld.volatile" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not STATUS["cuda"].ok, reason=f"cuda: {STATUS['cuda'].reason}")
def test_a_million_tasks_with_random_hot_swaps_on_cuda():
    rt = Runtime("cuda")
    rng = np.random.default_rng(1)
    n = 1_000_000
    counts = rt.zeros(n, np.int32)
    x = rt.to_device(np.arange(256, dtype=np.float32))
    out = rt.zeros(256 * 1024, np.float32)
    pr = PersistentRuntime(rt, blocks=64, block_size=256, ring_slots=4096, watchdog_s=60)
    pr.register("tick", tick, [counts])
    pr.register("axpy", axpy, [x, out])
    pr.start()
    done, swaps, minus = 0, 0, False
    last = {}
    while done < n:
        batch = int(min(n - done, rng.integers(5000, 60000)))
        ids = np.arange(done, done + batch)
        pr.submit_many("tick", [(int(i), 4000000001) for i in ids], groups=1)
        k = int(rng.integers(0, 1024))
        a, b = float(rng.uniform(-2, 2)), float(rng.uniform(-2, 2))
        pr.submit("axpy", groups=1, args=(a, b, 256 * k, 256))
        last[k] = (a, b, minus)
        done += batch
        if rng.random() < 0.3:
            minus = not minus
            pr.register("axpy", axmy if minus else axpy, [x, out])
            swaps += 1
    pr.wait()
    assert pr.shutdown() == []
    assert swaps >= 3
    assert np.array_equal(counts.numpy(), np.ones(n, np.int32))
    got = out.numpy().reshape(1024, 256)
    xs = np.arange(256, dtype=np.float32)
    for k, (a, b, m) in last.items():
        assert np.array_equal(got[k], expected_axpy(xs, a, b, 256, m))


@pytest.mark.parametrize("backend", [b for b in RING_BACKENDS if b in ("reference", "cuda")])
def test_a_traced_dispatcher_stamps_each_task_in_phase_order(backend):
    """trace=True: work-item 0 stamps claimed <= its turn <= record in hand <= ran <= marked with
    the device clock; the tasks' results are the untraced dispatcher's."""
    rt = Runtime(backend)
    x = rt.to_device(np.arange(256, dtype=np.float32))
    out = rt.zeros(256, np.float32)
    pr = PersistentRuntime(rt, blocks=2, block_size=64, ring_slots=16, trace=True)
    pr.register("axpy", axpy, [x, out])
    pr.start()
    first = pr.head
    pr.wait(pr.submit("axpy", groups=4, args=(2.0, 1.0, 0, 256), split=1))
    assert pr.shutdown() == []
    assert np.array_equal(out.numpy(), 2 * np.arange(256, dtype=np.float32) + 1)
    st = pr.stamps(first, first + 4).astype(np.int64)
    assert st.shape == (4, 5) and (st > 0).all()
    assert (np.diff(st, axis=1) >= 0).all()


@pytest.mark.parametrize("target", ["opencl", "hip"])
def test_tracing_needs_a_device_clock(target):
    """A traced dispatcher lowers only where the target has a device clock; elsewhere the
    refusal is one line (rendered here, so it holds whichever devices this machine has)."""
    rt = Runtime("reference")
    k = build_dispatcher([make_handler("tick", tick, [rt.zeros(8, np.int32)])], 4, trace=True)
    with pytest.raises(ConcordiaError, match=f"the {target} renderer has no spelling for op 'clock'"):
        render_source(k, target)


def test_publish_takes_only_encoded_records():
    rt = Runtime("reference")
    pr = PersistentRuntime(rt, blocks=1, block_size=32, ring_slots=4)
    pr.register("tick", tick, [rt.zeros(8, np.int32)])
    with pytest.raises(ConcordiaError, match=r"publish\(\) takes records from encode_tasks\(\) "
                                             r"\(2 x records x 32\), got an array of shape \(1, 16\)"):
        pr.publish(np.zeros((1, 16), np.int32))


@kernel
def bump_rows(counts: Ptr[i32], n: i32):
    i = global_id(0)
    if i < n:
        atomic_add(counts, i, 1)


@pytest.mark.parametrize("backend", [b for b in RING_BACKENDS if b in ("reference", "opencl", "cuda")])
def test_published_batches_wrap_the_ring_and_run_exactly_once(backend):
    """publish() / wait_range(): tasks of 12 and of 3 records through an 8-slot ring (every
    batch waits for slots and wraps), each work-item's counter bumped once per task."""
    rt = Runtime(backend)
    counts = rt.zeros(12 * 32, np.int32)
    pr = PersistentRuntime(rt, blocks=4, block_size=32, ring_slots=8, watchdog_s=60)
    pr.register("bump", bump_rows, [counts])
    pr.start()
    wide = pr.encode_tasks("bump", [(12 * 32,)], groups=12, split=1)     # 12 records
    narrow = pr.encode_tasks("bump", [(3 * 32,)], groups=3, split=1)     # 3 records
    for _ in range(5):
        pr.wait_range(*pr.publish(wide))
        pr.wait_range(*pr.publish(narrow))
    assert pr.shutdown() == []
    want = np.full(12 * 32, 5, np.int32)
    want[:3 * 32] += 5
    assert np.array_equal(counts.numpy(), want)


@pytest.mark.parametrize("backend", [b for b in RING_BACKENDS if b in ("reference", "opencl", "cuda")])
def test_the_dispatch_benchmarks_checkpoint_tasks_compute_the_checkpoint(backend):
    """bench/dispatch.py times the asynchronous checkpoint's device work (a block-table page
    list, a gather into host-mapped staging) through the ring and through launches: both give
    the pages a checkpoint needs (each cell's check fails before anything ran)."""
    from bench import dispatch
    rt = Runtime(backend)
    pr = PersistentRuntime(rt, blocks=2, block_size=64, ring_slots=64, watchdog_s=60)
    ops = {k: v for k, v in dispatch.OPS.items() if k.startswith(("kv_list", "gather"))}
    assert len(ops) == 2
    cells = []
    for op, make in ops.items():
        for size in (256, 4096):
            c = make(rt, op, size // 4, 64)
            with pytest.raises(AssertionError):   # nothing computed yet
                c.check()
            cells.append((f"{op}|{size}", c))
    pr.register_many([(key, c.kernel, c.bufs) for key, c in cells])
    pr.start()
    for key, c in cells:
        pr.wait_range(*pr.publish(dispatch.cell_records(pr, key, c.scalars, c.groups)))
    assert pr.shutdown() == []
    for key, c in cells:   # read after the resident kernel stopped; each check clears its output
        c.check()
        dispatch.DirectLaunch(rt, c.kernel, c.bufs, c.scalars(), c.groups, 64).launch()
        c.check()


@pytest.mark.parametrize("payloads", ["100", "256,x", ""])
def test_the_dispatch_benchmark_refuses_bad_payloads_in_one_line(payloads):
    assert "--payloads takes byte counts that are multiples of 256" in \
        usage_error("dispatch.py", "--backend", "reference", "--payloads", payloads, timeout=120)

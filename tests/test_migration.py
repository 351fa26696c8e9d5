"""Pausable kernels and migration: every safepoint of several kernels on every backend,
migration between every pair of backends, failures mid-migration, damaged snapshots."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from concordia.backends import backend_status
from concordia import (ConcordiaError, Ptr, Runtime, barrier, f32, global_id, i32, i64, kernel,
                          local_array, local_id, local_size, safepoint, u32)
from concordia.handlers.migration import SnapshotError, restore_snapshot
from concordia_ir.passes.safepoints import DONE, make_pausable

BACKENDS = [n for n in ("reference", "opencl", "cuda", "hip-on-cuda", "tenstorrent") if backend_status()[n].ok]


@kernel
def divergent(x: Ptr[i32], out: Ptr[i64], n: i32):
    i = global_id(0)
    if i >= n:
        return
    acc = i64(x[i])
    for t in range(i % 7 + 2):       # per-lane trip counts
        safepoint()
        if (t & 1) == 0:
            acc = acc * i64(3) + i64(t)
        else:
            acc = acc - i64(i)
        if acc > i64(10000000):
            out[i] = acc
            return                     # early exit inside the loop
    out[i] = acc


@kernel
def nested(x: Ptr[f32], out: Ptr[f32], outer: i32):
    i = global_id(0)
    v = x[i]
    scale = v * 0.5
    for a in range(outer):
        safepoint()
        for b in range(a + 1):         # a nested loop inside the pausable one
            v = v * 0.75 + scale * f32(b)
    out[i] = v


@kernel
def grouped(x: Ptr[f32], out: Ptr[f32], rounds: i32):
    """Barriers and local memory inside the pausable loop: the group pauses as a whole."""
    buf = local_array(f32, 64)
    lid = local_id(0)
    v = x[global_id(0)]
    for r in range(rounds):
        safepoint()
        buf[lid] = v
        barrier()
        v = v + buf[(lid + 1) % local_size(0)] * 0.5
        barrier()
    out[global_id(0)] = v


@kernel
def collatz(x: Ptr[u32], steps: Ptr[i32]):
    i = global_id(0)
    v = x[i]
    s = 0
    while v != u32(1) and s < 500:
        safepoint()
        v = v // u32(2) if (v & u32(1)) == u32(0) else v * u32(3) + u32(1)
        s += 1
    steps[i] = s


def case(name):
    rng = _FreshRng()
    if name == "divergent":
        return divergent, 96, 32, lambda: [rng.integers(-50, 500, 90).astype(np.int32), np.zeros(90, np.int64), 90]
    if name == "nested":
        return nested, 64, 32, lambda: [rng.random(64, dtype=np.float32), np.zeros(64, np.float32), 6]
    if name == "grouped":
        return grouped, 128, 64, lambda: [rng.random(128, dtype=np.float32), np.zeros(128, np.float32), 5]
    return collatz, 64, 32, lambda: [np.arange(1, 65, dtype=np.uint32) * 7, np.zeros(64, np.int32)]


class _FreshRng:
    """Each input draw starts from the same seed, so every call of make() gives equal inputs."""

    def __getattr__(self, attr):
        return getattr(np.random.default_rng(7), attr)


KERNELS = ["divergent", "nested", "grouped", "collatz"]


def launch_args(rt, host):
    return [rt.to_device(a) if isinstance(a, np.ndarray) else a for a in host]


def reference_result(name):
    k, g, l, make = case(name)
    rt = Runtime("reference")
    args = launch_args(rt, make())
    rt.launch(k, global_size=g, local_size=l, args=args)
    return [a.numpy() for a in args if hasattr(a, "numpy")]


def results(ctx):
    return [b.numpy() for b in ctx.buffers.values()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", KERNELS)
def test_pause_at_every_safepoint_then_finish_equals_uninterrupted(backend, name):
    k, g, l, make = case(name)
    rt = Runtime(backend)
    ctx = rt.launch(k, global_size=g, local_size=l, args=launch_args(rt, make()), pausable=True)
    ctx.pause()
    # restart from the top, paused at the first safepoint, then single-step through all of them
    ctx = type(ctx)(rt, k, g, l, launch_args(rt, make()), poll_every=1).start(paused=True).wait()
    stops = 0
    while ctx.state == "paused":
        ctx.step()
        stops += 1
        assert stops < 600
    assert ctx.state == "finished" and (ctx.statuses() == DONE).all()
    assert stops >= 2
    for got, want in zip(results(ctx), reference_result(name)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("src,dst", list(itertools.permutations(BACKENDS, 2)) or [("reference", "reference")])
@pytest.mark.parametrize("name", ["divergent", "grouped"])
def test_migration_between_every_pair(src, dst, name):
    k, g, l, make = case(name)
    rt = Runtime(src)
    ctx = type_ctx()(rt, k, g, l, launch_args(rt, make()), poll_every=1).start(paused=True).wait()
    ctx.step()
    moved = ctx.migrate(dst)
    assert moved.history[-1].verified and ctx.state == "released"
    moved.wait()
    for got, want in zip(results(moved), reference_result(name)):
        assert np.array_equal(got, want)


def type_ctx():
    from concordia.handlers.migration import KernelContext
    return KernelContext


def test_failure_during_migration_leaves_source_resumable(monkeypatch):
    import concordia.handlers.migration as m
    k, g, l, make = case("nested")
    rt = Runtime("reference")
    ctx = type_ctx()(rt, k, g, l, launch_args(rt, make()), poll_every=1).start(paused=True).wait()
    ctx.step()

    def broken(*a, **kw):
        raise ConcordiaError("the target died mid-restore")
    monkeypatch.setattr(m, "apply_image", broken)
    with pytest.raises(ConcordiaError, match="died mid-restore"):
        ctx.migrate("reference")
    monkeypatch.undo()
    assert ctx.state == "paused"
    ctx.resume().wait()
    for got, want in zip(results(ctx), reference_result("nested")):
        assert np.array_equal(got, want)


def paused_snapshot():
    k, g, l, make = case("collatz")
    rt = Runtime("reference")
    ctx = type_ctx()(rt, k, g, l, launch_args(rt, make()), poll_every=1).start(paused=True).wait()
    ctx.step()
    return ctx.snapshot()


@pytest.mark.parametrize("damage,match", [
    (lambda d: d[:len(d) // 2], "checksum mismatch"),
    (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "checksum mismatch"),
    (lambda d: b"NOTASNAP" + d[8:], "not a Concordia snapshot"),
    (lambda d: d[:8] + b"\x09\x00" + d[10:], "newer than this Concordia"),
])
def test_damaged_snapshot_is_refused(damage, match):
    data = paused_snapshot()
    with pytest.raises(SnapshotError, match=match):
        restore_snapshot(damage(data), Runtime("reference"))


def test_export_in_one_process_import_in_another(tmp_path):
    path = tmp_path / "ctx.ccsnap"
    code = f"""
import sys; sys.path.insert(0, {os.getcwd()!r})
from tests.test_migration import case, launch_args, type_ctx
from concordia import Runtime
k, g, l, make = case("divergent")
rt = Runtime("reference")
ctx = type_ctx()(rt, k, g, l, launch_args(rt, make()), poll_every=1).start(paused=True).wait()
ctx.step(); ctx.step()
ctx.export({str(path)!r})
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ctx = Runtime("reference").import_(str(path))
    assert ctx.state == "paused"
    ctx.resume().wait()
    for got, want in zip(results(ctx), reference_result("divergent")):
        assert np.array_equal(got, want)


def test_counted_loops_poll_every_n_iterations():
    """With the default stride, a single step runs up to 256 iterations: this kernel's loops are
    shorter, so one step after the first pause finishes every work-item."""
    k, g, l, make = case("nested")
    rt = Runtime("reference")
    ctx = type_ctx()(rt, k, g, l, launch_args(rt, make())).start(paused=True).wait()
    assert ctx.state == "paused"
    ctx.step()
    assert ctx.state == "finished"
    with pytest.raises(ConcordiaError, match="power of two"):
        make_pausable(k.kernel, poll_every=3)


def test_unsupported_safepoints_are_refused_at_their_line():
    @kernel
    def wrapped(x: Ptr[f32], n: i32):
        i = global_id(0)
        if i < n:
            for t in range(4):
                safepoint()  # UNDER_IF
                x[i] = x[i] + 1.0
    with pytest.raises(ConcordiaError, match=r"test_migration.py:\d+: kernel 'wrapped': safepoint 0 is not at the head of a top-level loop"):
        make_pausable(wrapped.kernel)

    @kernel
    def plain(x: Ptr[f32]):
        x[0] = 1.0
    with pytest.raises(ConcordiaError, match="has no safepoint"):
        make_pausable(plain.kernel)


def test_context_layout_is_described_and_vendor_neutral():
    pk = make_pausable(divergent.kernel)
    desc = pk.describe()
    assert desc["poll_every"] == 256 and "and" in str(pk.entry.body)
    slots = desc["slots"]["0"]
    assert slots[0][1] == "i32" and slots[0][2] == 2        # the loop counter first, after the header
    assert any(op.attr("chunk") == 256 for op in pk.entry.body.ops)   # strip-mined: one poll a chunk
    assert {s[1] for s in slots} <= {"i32", "i64"} and desc["record_words"] >= 2 + 1 + 2
    assert all(not p.name.startswith("cc.") for p in pk.entry.params[:-2])

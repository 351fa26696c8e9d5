"""SIGKILL during export and import of a kernel context, across processes.

A forked child runs a pausable kernel a few safepoints at a time and exports its context to
one file after every step (ctx.export: temp file, fsync, rename, fsync of the directory); it
is killed at a random moment. The file left behind must import in another process and
resume to the uninterrupted result, or, if no export finished, be absent. A second child
imports that file and resumes it and is killed too: the file must be untouched and still
import. CONCORDIA_MIGRATION_KILL_POINTS sets the number of kill points (default 200; the
README documents a 1000-point run)."""
import hashlib
import os
import signal
import time

import numpy as np
import pytest

from concordia import Ptr, Runtime, f32, global_id, i32, kernel, safepoint, u32
from concordia.handlers.migration import KernelContext

ITEMS, STEPS = 128, 24


@kernel
def walk(state: Ptr[f32], seeds: Ptr[u32], steps: i32):
    i = global_id(0)
    x = state[i]
    h = seeds[i]
    for t in range(steps):
        safepoint()
        h = h * u32(1664525) + u32(1013904223)
        x = x * 0.9 + f32(h >> u32(9)) * 1.0e-7
    state[i] = x
    seeds[i] = h


def inputs(rt):
    rng = np.random.default_rng(5)
    return (rt.to_device(rng.random(ITEMS, dtype=np.float32)),
            rt.to_device(rng.integers(0, 2**32, ITEMS, dtype=np.uint64).astype(np.uint32)))


def digest(bufs) -> str:
    return hashlib.sha256(b"".join(b.numpy().tobytes() for b in bufs)).hexdigest()


def uninterrupted() -> str:
    rt = Runtime("reference")
    bufs = inputs(rt)
    rt.launch(walk, global_size=ITEMS, local_size=64, args=(*bufs, STEPS))
    return digest(bufs)


def exporting_child(path: str, report=None):
    rt = Runtime("reference")
    ctx = KernelContext(rt, walk, ITEMS, 64, (*inputs(rt), np.int32(STEPS)), poll_every=1)
    ctx.start(paused=True).wait()
    while ctx.state == "paused":
        ctx.export(path)
        if report is not None:
            os.write(report, b"e")        # one export done
        ctx.step()


def importing_child(path: str, report=None):
    ctx = Runtime("reference").import_(path)
    ctx.resume().wait()
    ctx.export(path + ".elsewhere")   # a child never writes the file it imported


def finish(path: str) -> str:
    ctx = Runtime("reference").import_(path)
    ctx.resume().wait()
    return digest([ctx.buffers["state"], ctx.buffers["seeds"]])


def forked(fn, path: str, report: int | None = None) -> int:
    """Run fn(path, report) in a forked child that never returns into pytest: it exits 0
    when fn returns, 1 when fn raises. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn(path, report)
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def failed_on_its_own(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0


def killed(fn, path: str, exports: int, delay: float) -> None:
    """Fork a child running fn; wait until it has finished `exports` exports (so kill points
    spread over the whole run however fast this machine is right now), then `delay` more
    seconds, and SIGKILL it."""
    r, w = os.pipe()
    pid = forked(fn, path, w)
    os.close(w)
    seen = 0
    while seen < exports:
        got = os.read(r, exports - seen)
        if not got:                       # the child finished first
            break
        seen += len(got)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert not failed_on_its_own(status), "the child failed on its own"


def run_length(fn, path: str) -> float:
    t = time.perf_counter()
    _, status = os.waitpid(forked(fn, path), 0)
    assert not failed_on_its_own(status), f"{fn.__name__} failed on its own"
    return time.perf_counter() - t


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_during_export_and_import_never_leaves_a_bad_snapshot(tmp_path):
    points = int(os.environ.get("CONCORDIA_MIGRATION_KILL_POINTS", "200"))
    want = uninterrupted()
    Runtime("reference").backend.prepare(walk.kernel)
    probe = str(tmp_path / "probe.ccsnap")
    export_s = run_length(exporting_child, probe)
    import_s = run_length(importing_child, probe)
    rng = np.random.default_rng(99)
    seen = {"absent": 0, "resumed": 0, "import killed": 0}
    for k in range(points):
        path = str(tmp_path / f"k{k}.ccsnap")
        if k % 4 == 3 and os.path.exists(probe):        # kill an import of a finished export
            before = open(probe, "rb").read()
            killed(importing_child, probe, 0, float(rng.uniform(0, import_s)))
            assert open(probe, "rb").read() == before, f"point {k}: import changed the file"
            seen["import killed"] += 1
            continue
        killed(exporting_child, path, int(rng.integers(0, STEPS + 1)),
               float(rng.uniform(0, 2 * export_s / STEPS)))
        if not os.path.exists(path):
            seen["absent"] += 1
            continue
        assert finish(path) == want, f"point {k}: the snapshot resumed to another result"
        seen["resumed"] += 1
        os.remove(path)
    print(f"kill points: {seen}; export run {export_s:.3f} s, import run {import_s:.3f} s")
    assert finish(probe) == want
    assert seen["resumed"] > points // 3, seen

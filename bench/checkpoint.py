"""The paper's Figure 1: time to save one dirty 4 KiB page, by region size, three ways:
(a) CPU baseline: copy the whole region to the host and diff it there against a host copy,
(b) device-side scan (shadow mode), (c) store tracking. Plus scan bandwidth vs a
device-to-device copy, store-tracking overhead on the writing kernel, and log append speed.

    python3 bench/checkpoint.py [--backend cuda] [--sizes-mib 16 64 ...] [--json FILE]

Device time is the sum of the device's own timings (CUDA events via CuPy on the stream the
backend uses) of every kernel and copy of the step; wall time includes Python and syncs.
Targets (H100): scan >= 90 % of copy bandwidth; with store tracking one dirty page of a 1 GiB
region in <= 20 us of device time and >= 1000x faster than (a).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, table, write_result  # noqa: E402

from concordia import Ptr, Runtime, f32, global_id, i32, kernel  # noqa: E402
from concordia.handlers import DeltaLog  # noqa: E402
from concordia.handlers import kernels as hk  # noqa: E402
from concordia.handlers.checkpointer import _RegionState  # noqa: E402
from concordia.handlers.log import PAGE  # noqa: E402
from concordia.handlers.regions import Region  # noqa: E402
from concordia_ir.passes.tracking import instrument_stores  # noqa: E402


@kernel
def poke(x: Ptr[f32], at: i32):
    if global_id(0) == 0:
        x[at] = -x[at]   # always changes the bits (the sign), whatever the value


@kernel
def fill(x: Ptr[f32], n: i32):
    i = global_id(0)
    if i < n:
        x[i] = f32(i) * 0.5


SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


class DeviceClock:
    """Sums device time of every launch and copy on a runtime (CUDA events where present).

    Before each timed op the stream is held by a short spin kernel, so that the op is queued
    behind it before it can start: the events then bracket the op alone, not the host's
    Python latency in submitting it."""

    def __init__(self, rt: Runtime):
        self.rt, self.total, self.ops = rt, 0.0, 0
        self.trace: list[tuple[str, float]] = []
        self.cupy = None
        if rt.name in ("cuda", "hip-on-cuda"):
            try:
                import cupy
                self.cupy = cupy
                self.spin = cupy.RawKernel(SPIN, "spin")
            except ImportError:
                pass
        be = rt.backend
        for name in ("launch", "copy_in", "copy_out", "copy_device"):
            setattr(be, name, self._timed(name, getattr(be, name)))
        if self.cupy is not None:
            # small copies: bracket the asynchronous copy itself, not the host's wait for it
            be.copy_in = self._timed_async("copy_in", be.copy_in, be.copy_in_async, be.PINNED_BYTES)
            be.copy_out = self._timed_async("copy_out", be.copy_out, be.copy_out_async, be.PINNED_BYTES)

    def _timed_async(self, name, sync_fn, async_fn, limit):
        timed_sync = self._timed(name, sync_fn)

        def run(handle, host):
            if host.nbytes > limit:
                return timed_sync(handle, host)
            s, e = self.cupy.cuda.Event(), self.cupy.cuda.Event()
            self.spin((1,), (1,), (np.int64(400_000),))
            s.record()
            finish = async_fn(handle, host)
            e.record()
            e.synchronize()
            if finish is not None:
                finish()
            t = self.cupy.cuda.get_elapsed_time(s, e) / 1e3
            self.total += t
            self.ops += 1
            self.trace.append((f"{name}({host.nbytes})", round(t * 1e6, 2)))
        return run

    def _timed(self, name, fn):
        def run(*a, **k):
            before = self.total
            if self.cupy is None:
                t0 = time.perf_counter()
                out = fn(*a, **k)
                self.rt.backend.synchronize()
                self.total += time.perf_counter() - t0
            else:
                s, e = self.cupy.cuda.Event(), self.cupy.cuda.Event()
                self.spin((1,), (1,), (np.int64(400_000),))   # ~0.2 ms at H100 clocks
                s.record()
                out = fn(*a, **k)
                e.record()
                e.synchronize()
                self.total += self.cupy.cuda.get_elapsed_time(s, e) / 1e3
            self.ops += 1
            what = a[0].name if name == "launch" else f"{name}({getattr(a[-1], 'nbytes', a[-1])})"
            self.trace.append((what, round((self.total - before) * 1e6, 2)))
            return out
        return run

    def reset(self):
        self.total, self.ops, self.trace = 0.0, 0, []


def median(xs):
    return float(np.median(xs))


def one_page_save(rt: Runtime, clock: DeviceClock, nbytes: int, repeats: int) -> dict:
    n = nbytes // 4
    kv = rt.empty(n, np.float32)
    rt.launch(fill, global_size=-(-n // 256) * 256, local_size=256, args=(kv, n))
    region = Region(0, "kv", kv, 4096)
    row = {"region_MiB": nbytes >> 20}

    # (a) the CPU baseline: whole region to the host, diff against the host's previous copy
    shadow_host = kv.numpy()
    times = []
    for r in range(repeats):
        rt.launch(poke, global_size=1, local_size=1, args=(kv, (r * 7919 * 1024) % n))
        rt.synchronize()
        t0 = time.perf_counter()
        cur = kv.numpy()
        dirty = np.flatnonzero((cur.view(np.uint32).reshape(-1, 1024) !=
                                shadow_host.view(np.uint32).reshape(-1, 1024)).any(axis=1))
        pages = [cur[p * 1024:(p + 1) * 1024].tobytes() for p in dirty]
        times.append(time.perf_counter() - t0)
        shadow_host = cur
        assert len(pages) == 1
    row["cpu_baseline_ms"] = round(median(times) * 1e3, 3)
    del shadow_host, cur

    # (b) device-side scan against a device shadow, (c) store tracking
    for mode, label in (("shadow", "device_scan"), ("tracked", "store_tracking")):
        st = _RegionState(rt, region, mode)
        if mode == "shadow":
            st.shadow.copy_from(region.words())
            launch = lambda at: rt.launch(poke, global_size=1, local_size=1, args=(kv, at))
        else:
            tracked = instrument_stores(poke.kernel, {"x": 1024})
            launch = lambda at: rt.launch(tracked, global_size=1, local_size=1,
                                          args=(kv, at, st.flags))
        dev, wall = [], []
        for r in range(repeats):
            launch((r * 7919 * 1024 + 5) % n)
            rt.synchronize()
            clock.reset()
            t0 = time.perf_counter()
            pages = st.find_dirty()
            saved = list(st.gather(pages))
            st.after_commit(pages)
            rt.synchronize()
            wall.append(time.perf_counter() - t0)
            dev.append(clock.total)
            trace = list(clock.trace)
            assert len(saved) == 1 and len(saved[0][1]) == 4096
        row[f"{label}_device_us"] = round(median(dev) * 1e6, 2)
        row[f"{label}_ops_us"] = trace
        row[f"{label}_wall_ms"] = round(median(wall) * 1e3, 3)
        for b in (st.dirty, st.count, st.staging, st.shadow) + ((st.flags,) if st.flags else ()):
            rt.free(b)
    row["tracking_speedup_vs_cpu"] = round(row["cpu_baseline_ms"] * 1e3 / row["store_tracking_device_us"], 1)

    # scan bandwidth (clean region: no page dirty) vs device-to-device copy of the same bytes
    st = _RegionState(rt, region, "shadow")
    st.shadow.copy_from(region.words())
    scan = hk.page_scanner(region.words_per_page, region.n_words)
    scans, copies = [], []
    for _ in range(max(7, repeats)):
        st.count.write(np.zeros(1, np.int32))
        clock.reset()
        rt.launch(scan, global_size=region.n_pages * hk.GROUP, local_size=hk.GROUP,
                  args=(region.words(), st.shadow, st.dirty, st.count))
        scans.append(clock.total)
        clock.reset()
        st.shadow.copy_from(region.words())
        copies.append(clock.total)
    t_scan, t_copy = median(scans), median(copies)
    row["scan_GB_s"] = round(2 * nbytes / t_scan / 1e9, 1)       # reads region + shadow
    row["copy_GB_s"] = round(2 * nbytes / t_copy / 1e9, 1)       # reads + writes
    row["scan_vs_copy"] = round(t_copy / t_scan, 3)
    for b in (st.dirty, st.count, st.staging, st.shadow, kv):
        rt.free(b)
    return row


def tracking_overhead(rt: Runtime, clock: DeviceClock, n: int) -> dict:
    from concordia.backends.conformance.cases import vector_add
    a, b, c = (rt.zeros(n, np.float32) for _ in range(3))
    flags = rt.zeros(-(-n // 1024), np.int32)
    tracked = instrument_stores(vector_add.kernel, {"out": 1024})
    g = -(-n // 256) * 256
    plain, inst = [], []
    for _ in range(10):
        clock.reset()
        rt.launch(vector_add, global_size=g, local_size=256, args=(a, b, c, n))
        plain.append(clock.total)
        clock.reset()
        rt.launch(tracked, global_size=g, local_size=256, args=(a, b, c, n, flags))
        inst.append(clock.total)
    return {"elements": n, "plain_ms": round(median(plain) * 1e3, 4),
            "tracked_ms": round(median(inst) * 1e3, 4),
            "overhead_pct": round((median(inst) / median(plain) - 1) * 100, 1)}


def log_append(pages: int = 20000) -> dict:
    payload = os.urandom(4096)
    with tempfile.TemporaryDirectory() as tmp:
        log = DeltaLog(os.path.join(tmp, "bench.clog"), fsync="no")
        t0 = time.perf_counter()
        for p in range(pages):
            log.append(PAGE, payload, region=0, page=p)
        log.commit(1, {})
        t = time.perf_counter() - t0
        log.close()
        log = DeltaLog(os.path.join(tmp, "bench2.clog"), fsync="always")
        commits = []
        for k in range(50):
            log.append(PAGE, payload, region=0, page=k)
            t1 = time.perf_counter()
            log.commit(k + 1, {})
            commits.append(time.perf_counter() - t1)
        log.close()
    return {"append_MB_s": round(pages * 4096 / t / 1e6, 1),
            "fsync_always_commit_ms_median": round(median(commits) * 1e3, 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default=None)
    p.add_argument("--sizes-mib", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rt = Runtime(args.backend)
    clock = DeviceClock(rt)
    gpu = rt.name == "cuda"
    sizes = args.sizes_mib or ([16, 64, 256, 1024, 4096] if gpu else [16, 64])
    rows = []
    for mib in sizes:
        rows.append(one_page_save(rt, clock, mib << 20, args.repeats))
        print(rows[-1], file=sys.stderr)
    cols = ["region_MiB", "cpu_baseline_ms", "device_scan_device_us", "device_scan_wall_ms",
            "store_tracking_device_us", "store_tracking_wall_ms", "tracking_speedup_vs_cpu",
            "scan_GB_s", "copy_GB_s", "scan_vs_copy"]
    print(table(rows, cols))
    for r in rows:
        print(f"{r['region_MiB']} MiB, device time per op: scan {r['device_scan_ops_us']}; "
              f"tracking {r['store_tracking_ops_us']}")
    over = tracking_overhead(rt, clock, (1 << 26) if gpu else (1 << 20))
    print(f"store tracking overhead on vector_add: {over}")
    logs = log_append()
    print(f"log: {logs}")
    env = environment(str(rt.backend.device_info()))
    write_result("checkpoint", {"benchmark": "Figure 1: save one dirty 4 KiB page",
                                "backend": rt.name, "environment": env, "rows": rows,
                                "tracking_overhead": over, "log": logs}, args.json)


if __name__ == "__main__":
    main()

"""Safepoint polling overhead, pause latency, and migration time per hop against the time the
bytes need at the measured host<->device bandwidth.

    python3 bench/migration.py [--path cuda,hip-on-cuda,opencl] [--mib 64] [--json FILE]

Targets (H100, cuda hops): polling overhead <= 2 %; each hop <= 1.5 x (bytes / bandwidth) + 50 ms.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, table, write_result  # noqa: E402

from concordia import Runtime  # noqa: E402
from concordia.demo import drift  # noqa: E402
from concordia.handlers.migration import KernelContext, pausable  # noqa: E402


def inputs(rt, n):
    rng = np.random.default_rng(0)
    return (rt.to_device(rng.random(n, dtype=np.float32)),
            rt.to_device(rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)),
            rt.zeros(n, np.float32))


def timed(rt, fn, repeats=5):
    fn()
    rt.synchronize()
    best = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rt.synchronize()
        best.append(time.perf_counter() - t)
    return float(np.median(best))


def polling_overhead(rt, n, steps):
    bufs = inputs(rt, n)
    g = -(-n // 256) * 256
    pk = pausable(drift.kernel)
    plain = timed(rt, lambda: rt.launch(drift, global_size=g, local_size=256, args=(*bufs, steps, n)))

    ctx = KernelContext(rt, drift, g, 256, (*bufs, steps, n))   # context allocated once
    polled = timed(rt, ctx.start)   # the kernel alone: wait() would also read every record
    return {"items": n, "steps": steps, "plain_s": round(plain, 5), "pausable_s": round(polled, 5),
            "overhead_pct": round((polled / plain - 1) * 100, 2), "record_words": pk.record_words}


def pause_latency(rt, n, steps, tries=5):
    bufs = inputs(rt, n)
    g = -(-n // 256) * 256
    lat = []
    for _ in range(tries):
        ctx = KernelContext(rt, drift, g, 256, (*bufs, steps, n)).start()
        time.sleep(0.05)
        t = time.perf_counter()
        ctx.pause()
        lat.append(time.perf_counter() - t)
        ctx.resume().wait()
        ctx.release()
    return round(float(np.median(lat)) * 1e3, 3)


def bandwidth(rt, mib):
    host = np.ones(mib << 18, np.float32)
    buf = rt.to_device(host)
    h2d = timed(rt, lambda: buf.write(host), 3)
    d2h = timed(rt, lambda: buf.numpy(), 3)
    rt.free(buf)
    return host.nbytes / h2d, host.nbytes / d2h


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--path", default=None)
    p.add_argument("--mib", type=int, default=None, help="total size of the kernel's regions")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from concordia.demo import default_path
    path = args.path.split(",") if args.path else default_path()
    rts = [Runtime(x) for x in path]
    gpu = rts[0].name == "cuda"
    mib = args.mib or (192 if gpu else 12)
    n = (mib << 20) // 12                       # three 4-byte regions
    steps = 4000 if gpu else 200
    over = polling_overhead(rts[0], n, steps)
    print(f"safepoint polling overhead on {rts[0].spec}: {over}")
    lat = pause_latency(rts[0], n, steps * 20)
    print(f"pause latency on {rts[0].spec}: {lat} ms (median)")
    bw = {str(r.spec): bandwidth(r, 256 if gpu else 32) for r in rts}
    rows = []
    for warm in (True, False):   # the first pass fills the kernel caches; the second is measured
        bufs = inputs(rts[0], n)
        g = -(-n // 256) * 256
        ctx = KernelContext(rts[0], drift, g, 256, (*bufs, steps * 50, n)).start()
        for target in rts[1:] + rts[:1]:
            time.sleep(0.02)
            ctx = ctx.migrate(target)
            h = ctx.history[-1]
            src_d2h = bw[h.source][1]
            dst_h2d = bw[h.target][0]
            ideal = h.bytes / src_d2h + h.bytes / dst_h2d
            total = h.pause_s + h.snapshot_s + h.transfer_s + h.compile_s + h.restore_s + h.resume_s
            if not warm:
                rows.append({"hop": f"{h.source}->{h.target}", "MiB": round(h.bytes / 2**20, 1),
                             "total_ms": round(total * 1e3, 1), "ideal_ms": round(ideal * 1e3, 1),
                             "bound_ms": round((1.5 * ideal + 0.05) * 1e3, 1),
                             "within": total <= 1.5 * ideal + 0.05,
                             **{k: round(getattr(h, k) * 1e3, 2) for k in
                                ("pause_s", "snapshot_s", "compile_s", "restore_s", "resume_s")}})
        ctx.pause()
        ctx.release()
    print(table(rows, list(rows[0])))
    write_result("migration", {"environment": environment(str(rts[0].backend.device_info())),
                               "path": path, "polling": over, "pause_latency_ms": lat,
                               "bandwidth_GB_s": {k: [round(x / 1e9, 2) for x in v] for k, v in bw.items()},
                               "hops": rows}, args.json)


if __name__ == "__main__":
    main()

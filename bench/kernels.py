"""Lowered kernels vs hand-written CUDA; compile time cold vs cached; launch overhead.

    python3 bench/kernels.py [--backend cuda] [--json FILE] [--quick]

Device time comes from events on the stream both sides launch on (CuPy's, when CuPy is
there), so Python launch overhead is measured separately and does not blur bandwidth.
Targets (H100): vector add and reduction >= 90 % of the hand-written bandwidth; cached
kernel load <= 5 ms.
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

from concordia import (Ptr, Runtime, barrier, f32, global_id, global_size, group_id,  # noqa: E402
                          i32, kernel, local_array, local_id)
from concordia.backends.conformance.cases import gemm_tiled, vector_add  # noqa: E402


@kernel
def reduce_partial(x: Ptr[f32], partial: Ptr[f32], n: i32):
    buf = local_array(f32, 256)
    lid = local_id(0)
    acc = 0.0
    j = global_id(0)
    stride = global_size(0)
    while j < n:
        acc += x[j]
        j += stride
    buf[lid] = acc
    barrier()
    s = 128
    while s > 0:
        if lid < s:
            buf[lid] = buf[lid] + buf[lid + s]
        barrier()
        s = s // 2
    if lid == 0:
        partial[group_id(0)] = buf[0]


@kernel
def touch(x: Ptr[f32]):
    x[global_id(0)] = 1.0


HAND_CUDA = r"""
extern "C" __global__ void vadd(const float* a, const float* b, float* c, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i] = a[i] + b[i];
}
extern "C" __global__ void reduce_partial(const float* x, float* partial, int n) {
    __shared__ float buf[256];
    int lid = threadIdx.x;
    float acc = 0.0f;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < n; j += gridDim.x * blockDim.x) acc += x[j];
    buf[lid] = acc;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (lid < s) buf[lid] += buf[lid + s];
        __syncthreads();
    }
    if (lid == 0) partial[blockIdx.x] = buf[0];
}
extern "C" __global__ void gemm(const float* a, const float* b, float* c, int m, int n, int k) {
    __shared__ float ta[256];
    __shared__ float tb[256];
    int tx = threadIdx.x, ty = threadIdx.y;
    int col = blockIdx.x * 16 + tx, row = blockIdx.y * 16 + ty;
    float acc = 0.0f;
    for (int t0 = 0; t0 < k; t0 += 16) {
        ta[ty * 16 + tx] = (row < m && t0 + tx < k) ? a[row * k + t0 + tx] : 0.0f;
        tb[ty * 16 + tx] = (t0 + ty < k && col < n) ? b[(t0 + ty) * n + col] : 0.0f;
        __syncthreads();
        for (int kk = 0; kk < 16; ++kk) acc = __fadd_rn(acc, __fmul_rn(ta[ty * 16 + kk], tb[kk * 16 + tx]));
        __syncthreads();
    }
    if (row < m && col < n) c[row * n + col] = acc;
}
"""


class Timer:
    """Device time per call through CuPy events when present; else wall time after a sync."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        try:
            import cupy
            self.cupy = cupy if rt.name in ("cuda", "hip-on-cuda") else None
        except ImportError:
            self.cupy = None

    def __call__(self, fn, repeats: int = 20) -> float:
        fn()
        self.rt.synchronize()
        if self.cupy is not None:
            start, end = self.cupy.cuda.Event(), self.cupy.cuda.Event()
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return self.cupy.cuda.get_elapsed_time(start, end) / 1e3 / repeats
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.rt.synchronize()
        return (time.perf_counter() - t0) / repeats


def bench_bandwidth(rt: Runtime, timer: Timer, n: int, hand) -> list[dict]:
    rng = np.random.default_rng(0)
    a, b = (rt.to_device(rng.standard_normal(n).astype(np.float32)) for _ in range(2))
    c = rt.empty(n, np.float32)
    rows = []
    t = timer(lambda: rt.launch(vector_add, global_size=n, local_size=256, args=(a, b, c, n)))
    rows.append({"kernel": "vector_add", "impl": f"concordia/{rt.name}", "n": n,
                 "ms": round(t * 1e3, 4), "GB_s": round(3 * 4 * n / t / 1e9, 1)})
    groups = 132 * 8
    partial = rt.empty(groups, np.float32)
    t = timer(lambda: rt.launch(reduce_partial, global_size=groups * 256, local_size=256,
                                args=(a, partial, n)))
    rows.append({"kernel": "reduction", "impl": f"concordia/{rt.name}", "n": n,
                 "ms": round(t * 1e3, 4), "GB_s": round(4 * n / t / 1e9, 1)})
    want = a.numpy().astype(np.float64).sum()
    got = partial.numpy().astype(np.float64).sum()
    assert abs(got - want) <= 1e-3 * (1 + abs(want)) + 1e-2 * np.sqrt(n), (got, want)
    if hand is not None:
        cp, mod = hand
        ha, hb = cp.asarray(a.numpy()), cp.asarray(b.numpy())
        hc, hp = cp.empty(n, cp.float32), cp.empty(groups, cp.float32)
        vadd, red = mod.get_function("vadd"), mod.get_function("reduce_partial")
        t = timer(lambda: vadd(((n + 255) // 256,), (256,), (ha, hb, hc, np.int32(n))))
        rows.append({"kernel": "vector_add", "impl": "hand-written CUDA", "n": n,
                     "ms": round(t * 1e3, 4), "GB_s": round(3 * 4 * n / t / 1e9, 1)})
        t = timer(lambda: red((groups,), (256,), (ha, hp, np.int32(n))))
        rows.append({"kernel": "reduction", "impl": "hand-written CUDA", "n": n,
                     "ms": round(t * 1e3, 4), "GB_s": round(4 * n / t / 1e9, 1)})
        t = timer(lambda: cp.sum(ha))
        rows.append({"kernel": "reduction", "impl": "cupy.sum (context)", "n": n,
                     "ms": round(t * 1e3, 4), "GB_s": round(4 * n / t / 1e9, 1)})
    for buf in (a, b, c, partial):
        rt.free(buf)
    return rows


def bench_gemm(rt: Runtime, timer: Timer, size: int, hand) -> list[dict]:
    rng = np.random.default_rng(1)
    ha, hb = (rng.standard_normal(size * size).astype(np.float32) for _ in range(2))
    a, b, c = rt.to_device(ha), rt.to_device(hb), rt.empty(size * size, np.float32)
    g = ((size + 15) // 16 * 16,) * 2
    t = timer(lambda: rt.launch(gemm_tiled, global_size=g, local_size=(16, 16),
                                args=(a, b, c, size, size, size)), repeats=5)
    flops = 2 * size ** 3
    rows = [{"kernel": "gemm", "impl": f"concordia/{rt.name}", "n": size, "ms": round(t * 1e3, 3),
             "GFLOP_s": round(flops / t / 1e9, 1)}]
    if hand is not None:
        cp, mod = hand
        da, db, dc = cp.asarray(ha), cp.asarray(hb), cp.empty(size * size, cp.float32)
        fn = mod.get_function("gemm")
        t = timer(lambda: fn((g[0] // 16, g[1] // 16), (16, 16), (da, db, dc, np.int32(size),
                                                                   np.int32(size), np.int32(size))), 5)
        rows.append({"kernel": "gemm", "impl": "hand-written CUDA", "n": size,
                     "ms": round(t * 1e3, 3), "GFLOP_s": round(flops / t / 1e9, 1)})
        assert np.array_equal(dc.get(), c.numpy()), "hand-written and lowered GEMM differ"
        m2a, m2b = da.reshape(size, size), db.reshape(size, size)
        t = timer(lambda: m2a @ m2b, 5)
        rows.append({"kernel": "gemm", "impl": "cuBLAS (context)", "n": size,
                     "ms": round(t * 1e3, 3), "GFLOP_s": round(flops / t / 1e9, 1)})
    return rows


def bench_compile(backend: str) -> dict:
    """Cold: empty cache (codegen + compile + load). Cached: a new runtime, disk cache hit."""
    from concordia.backends import BACKENDS
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CONCORDIA_CACHE_DIR"] = tmp
        for label in ("cold", "cached"):
            be = BACKENDS[backend](None)
            t0 = time.perf_counter()
            be.compile(gemm_tiled.kernel)
            out[f"{label}_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
        os.environ.pop("CONCORDIA_CACHE_DIR")
    return out


def bench_launch(rt: Runtime, calls: int = 2000) -> float:
    x = rt.empty(256, np.float32)
    rt.launch(touch, global_size=256, local_size=256, args=(x,))
    rt.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        rt.launch(touch, global_size=256, local_size=256, args=(x,))
    rt.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", nargs="+", default=None, help="default: every available compiling backend")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="small sizes (CPU)")
    args = p.parse_args(argv)
    from concordia.backends import backend_status
    status = backend_status()
    names = args.backend or [n for n in ("cuda", "hip-on-cuda", "opencl") if status[n].ok]
    n = 1 << (20 if args.quick else 26)
    size = 256 if args.quick else 2048
    result = {"environment": environment(), "backends": {}}
    hand = None
    try:
        import cupy
        if not args.quick:
            hand = (cupy, cupy.RawModule(code=HAND_CUDA, options=("--fmad=false",)))
            result["environment"]["device"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
            result["environment"]["cupy"] = cupy.__version__
    except ImportError:
        pass
    for name in names:
        rt = Runtime(name)
        timer = Timer(rt)
        use_hand = hand if name in ("cuda", "hip-on-cuda") else None
        rows = bench_bandwidth(rt, timer, n, use_hand) + bench_gemm(rt, timer, size, use_hand)
        res = {"device": rt.backend.device_info(), "rows": rows,
               "compile": bench_compile(name), "launch_overhead_us": round(bench_launch(rt), 2)}
        for k in ("vector_add", "reduction"):
            ours = [r for r in rows if r["kernel"] == k and r["impl"].startswith("concordia")]
            ref = [r for r in rows if r["kernel"] == k and r["impl"] == "hand-written CUDA"]
            if ours and ref:
                res[f"{k}_fraction_of_hand_written"] = round(ours[0]["GB_s"] / ref[0]["GB_s"], 3)
        result["backends"][name] = res
        print(f"\n== {name}: {res['device']}")
        print(table(rows, ["kernel", "impl", "n", "ms", "GB_s", "GFLOP_s"]))
        print(f"compile: {res['compile']}   launch overhead: {res['launch_overhead_us']} us")
        for k in ("vector_add", "reduction"):
            if f"{k}_fraction_of_hand_written" in res:
                print(f"{k}: {res[f'{k}_fraction_of_hand_written'] * 100:.1f} % of hand-written")
    ref_rt = Runtime("reference")
    result["backends"]["reference"] = {"launch_overhead_us": round(bench_launch(ref_rt, 200), 2)}
    print(f"\nreference launch overhead: {result['backends']['reference']['launch_overhead_us']} us")
    write_result("kernels", result, args.json)


if __name__ == "__main__":
    main()

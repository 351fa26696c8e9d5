"""Reference-interpreter throughput in work-item-ops per second (target: >= 1 M/s on 2 cores)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, table, write_result  # noqa: E402

from concordia import Ptr, Runtime, f32, global_id, i32, kernel  # noqa: E402
from concordia_ir.ops import walk  # noqa: E402


@kernel
def saxpy(a: f32, x: Ptr[f32], y: Ptr[f32], out: Ptr[f32], n: i32):
    i = global_id(0)
    if i < n:
        out[i] = a * x[i] + y[i]


def measure(n: int, repeats: int = 5) -> dict:
    rt = Runtime("reference")
    x = rt.to_device(np.random.default_rng(0).standard_normal(n).astype(np.float32))
    y = rt.to_device(np.ones(n, np.float32))
    out = rt.empty(n, np.float32)
    args = (np.float32(2.0), x, y, out, np.int32(n))
    rt.launch(saxpy, global_size=n, local_size=64, args=args)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        rt.launch(saxpy, global_size=n, local_size=64, args=args)
        times.append(time.perf_counter() - t0)
    ops = sum(1 for _ in walk(saxpy.kernel.body))
    best = min(times)
    return {"work_items": n, "ops_per_item": ops, "seconds": round(best, 5),
            "work_item_ops_per_s": round(n * ops / best)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default=None, help="output file (default bench/results/interpreter.json)")
    args = p.parse_args(argv)
    rows = [measure(n) for n in (1 << 12, 1 << 16, 1 << 20)]
    print(table(rows, ["work_items", "ops_per_item", "seconds", "work_item_ops_per_s"]))
    write_result("interpreter", {"benchmark": "reference interpreter, saxpy",
                                 "target_work_item_ops_per_s": 1_000_000,
                                 "environment": environment(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()

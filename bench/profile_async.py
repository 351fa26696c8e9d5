"""Where checkpoint_async's time goes in a live decode (issue 15): the caller's enqueue split
into its parts (slot, page lists, graph replay, event record), the writer's time a checkpoint,
and the same enqueue with the writer idle (flushed before each call) to tell its own cost from
contention with the writer thread for the GIL.

    python bench/profile_async.py --batches 1,8 --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from concordia import llm as L  # noqa: E402


def one(config, batch, tokens, idle_writer: bool):
    log = os.path.join(tempfile.mkdtemp(), "p.clog")
    a = L.parse_args(["--config", config, "--batch", str(batch), "--prompt", "16", "--tokens",
                 str(tokens), "--log", log, "--every", "1", "--async", "--backend", "cuda"])
    run = L.DecodeRun(a)
    run.open_checkpointer()
    if idle_writer:
        real = run.ckpt.checkpoint_async

        def flushed():
            run.ckpt.flush()
            return real()
        run.ckpt.checkpoint_async = flushed
    run.generate()
    run.ckpt.close()
    hs = [h for h in run.handles if h.phases.get("graph") is not None]
    out = {"enqueue_us": float(np.median([h.enqueue_s for h in hs]) * 1e6),
           "step_ms": float(np.median(run.step_seconds) * 1e3)}
    for k in ("slot", "lists", "graph", "event", "write"):
        vals = [h.phases[k] for h in hs if k in h.phases]
        if vals:
            out[k + "_us"] = float(np.median(vals) * 1e6)
    return out


# the device work of a capture, by the names its kernels and copies carry in a trace
CAPTURE_WORK = ("scan_pages", "gather_counted", "list_kv_pages", "advance_kv_pages", "Memset")


def trace(config, batch, tokens, page_size, out):
    """torch.profiler over a steady stretch of a checkpointed decode: the device time a step
    spends in the capture's kernels and copies, against the decode's own."""
    from torch.profiler import ProfilerActivity, profile
    log = os.path.join(tempfile.mkdtemp(), "t.clog")
    a = L.parse_args(["--config", config, "--batch", str(batch), "--prompt", "16", "--tokens",
                      str(tokens), "--log", log, "--every", "1", "--async", "--backend", "cuda",
                      "--page-size", str(page_size)])
    run = L.DecodeRun(a)
    run.open_checkpointer()
    steps = run.max_len - 1   # every decode step, the prompt's included, is in the trace
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run.generate()
    run.ckpt.close()
    rows = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t:
            rows[e.key] = rows.get(e.key, 0.0) + t
    capture = {k: v for k, v in rows.items() if any(w in k for w in CAPTURE_WORK)}
    name = f"trace-b{batch}-p{page_size}"
    with open(os.path.join(out, name + ".txt"), "w") as fh:
        for k, v in sorted(rows.items(), key=lambda kv: -kv[1])[:40]:
            fh.write(f"{v / steps:10.1f} us/step  {k}\n")
    total = sum(rows.values()) / steps
    cap = sum(capture.values()) / steps
    return {"device_us_per_step": round(total, 1), "capture_us_per_step": round(cap, 1),
            "capture_pct": round(100 * cap / total, 2),
            "capture_parts_us_per_step": {k: round(v / steps, 1) for k, v in capture.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--out", default=tempfile.mkdtemp())
    p.add_argument("--trace", action="store_true",
                   help="instead: torch.profiler's device time of the capture per step")
    p.add_argument("--page-sizes", default="4096")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.trace:
        res = {}
        for b in (int(x) for x in a.batches.split(",")):
            for ps in (int(x) for x in a.page_sizes.split(",")):
                res[f"batch {b}, page {ps}"] = r = trace(a.config, b, a.tokens, ps, a.out)
                print(f"batch {b}, page {ps}", r, flush=True)
        with open(os.path.join(a.out, "profile_async_trace.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        return
    one(a.config, 1, 8, False)   # warm-up
    res = {}
    for b in (int(x) for x in a.batches.split(",")):
        for idle in (False, True):
            key = f"batch {b}, writer {'idle' if idle else 'running'}"
            res[key] = {k: round(v, 1) for k, v in one(a.config, b, a.tokens, idle).items()}
            print(key, res[key], flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "profile_async.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()

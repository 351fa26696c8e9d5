"""Where a checkpoint's capture spends its device time, node by node (issue 15's profile):
torch.profiler's CUDA trace of a decode with checkpoint_async every step, once with the
capture in the decode stream (device_side="stream") and once forked (device_side="fork"),
and for each the nodes of a capture in the middle of the run: name, stream, start (us, from
the block-table lister's start) and length. A run after torch.profiler in the same process
is slower on the host (graph replays took 0.3-0.5 ms of host time), so this times nodes, not
throughput: bench/llm.py and bench/decode_timeline.py do that.

    python bench/profile_capture.py --batch 8 --out DIR

What it found on an H100 (session 8): at batch 8 the in-stream capture's last node ended
~45 us after its first; the KV gather (~20 us of host-mapped writes) and, beside it, the
adapter's chain of five dependent nodes (memset, scan, gather, two copies out) set that
length; with the KV gather forked the stream kept ~25 us, the adapter's and scheduler's
chains, which the shadow copies (SNAPSHOT_BYTES) then moved off the stream too.
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

from bench.common import environment, write_result  # noqa: E402

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


# what a capture's graphs run (staging_ring.py): every other device event is the decode's
CAPTURE_NODES = ("list_kv_pages", "advance_kv_pages", "scan_pages", "gather_counted", "Memcpy",
                 "Memset")


def capture_nodes(trace: dict) -> list[list[tuple]]:
    """Each capture's nodes (name, stream, start us from its lister, length us, bytes): from
    after the step's token read-back before its lister, through the capture's nodes on the decode
    stream up to the next step's first kernel, and its nodes on other streams (a forked
    capture's) up to the next capture's lister. (The decode loop enqueues the next step
    before it reads a step's tokens, so the next step, not a copy in, ends a capture.)"""
    ev = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS),
                key=lambda e: e["ts"])
    listers = [i for i, e in enumerate(ev) if e["name"] == "list_kv_pages"]
    out = []
    for n, i in enumerate(listers):
        t0, stream, j = ev[i]["ts"], ev[i]["args"].get("stream"), i
        while j > 0 and ev[j - 1]["ts"] > t0 - 3 and not ev[j - 1]["name"].startswith("Memcpy DtoH"):
            j -= 1
        end = listers[n + 1] if n + 1 < len(listers) else len(ev)
        step = next((k for k in range(i, end) if ev[k]["args"].get("stream") == stream
                     and not ev[k]["name"].startswith(CAPTURE_NODES)), end)
        nodes = ev[j:step] + [e for e in ev[step:end] if e["args"].get("stream") != stream
                              and e["name"].startswith(CAPTURE_NODES)]
        out.append([(e["name"][:40], e["args"].get("stream"), round(e["ts"] - t0, 1),
                     round(e["dur"], 1), e["args"].get("bytes")) for e in nodes])
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=40, help="profiled steps a run")
    p.add_argument("--out", default=None, help="folder for the chrome traces (default: a temporary one)")
    p.add_argument("--name", default=None)
    a = p.parse_args(argv)
    if a.batch < 1 or a.tokens < 16:
        p.error("--batch must be >= 1 and --tokens >= 16")
    import torch
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (the capture's graph nodes are traced by CUPTI)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from bench.llm import run_kind
    from concordia import llm as L
    out = a.out or tempfile.mkdtemp(prefix="concordia-capture-")
    os.makedirs(out, exist_ok=True)
    run = L.DecodeRun(L.parse_args(["--config", a.config, "--device", "cuda", "--prompt", "32",
                                    "--tokens", str(a.tokens + 56), "--batch", str(a.batch)]))
    run.generate(stop_after=4)
    log = os.path.join(tempfile.mkdtemp(prefix="concordia-capture-"), "p.clog")
    for kind in ("async", "fork"):   # warm: every slot's graphs made, kernels loaded
        run_kind(run, kind, log, None, stop_after=a.tokens)
    result = {}
    for kind in ("async", "fork"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run_kind(run, kind, log, None, stop_after=a.tokens)
        path = os.path.join(out, f"trace-{kind}-b{a.batch}.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            caps = capture_nodes(json.load(fh))
        ends = [max(n[2] + n[3] for n in c) for c in caps if c]
        middle = caps[len(caps) // 2] if caps else []
        result[kind] = {"captures": len(caps), "last_node_end_us_median": round(float(np.median(ends)), 1),
                        "nodes": middle, "trace": path}
        print(f"{kind}: {len(caps)} captures; a middle one's nodes (name, stream, start us, us, bytes):")
        for n in middle:
            print("   ", n)
    env = environment(torch.cuda.get_device_name())
    env.update(torch=torch.__version__)
    write_result(a.name or f"profile-capture-{a.config}-b{a.batch}",
                 {"env": env, "config": a.config, "batch": a.batch, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

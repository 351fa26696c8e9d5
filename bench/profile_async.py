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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--out", default=tempfile.mkdtemp())
    a = p.parse_args()
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

"""What part of the GenerationGuard costs what: transformers' generate timed without a guard,
with it, and with parts of the guard's checkpoint writer taken out, interleaved in one
process. The ablations patch the writer's methods, so their logs are not restorable: this is
a profiling tool, not a checkpoint.

    python bench/hf_guard_ablation.py --size qwen3-0.6b --tokens 256 --repeats 7

Kinds: plain (no stopping criterion), guard, no-appends (the writer skips its log appends),
no-pieces (and reading the staging), idle-writer (it only waits for each capture and frees
its slot), no-gc (the guard with the garbage collector off during generate).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from bench.common import environment, write_result  # noqa: E402

KINDS = ("plain", "guard", "no-appends", "no-pieces", "idle-writer", "no-gc")


def _idle_write(writer, cap):
    """The writer's _write, doing nothing but wait for the capture and free its slot."""
    from concordia.handlers.regions import CheckpointStats
    if cap.pieces is None:
        writer.backend.wait_event(cap.event)
    writer.free.put(cap.slot)
    cap.released = True
    cap.handle.stats = CheckpointStats(cap.id, 0, 0, 0.0, False)


def _patches(kind: str) -> dict:
    """CheckpointWriter / StagingRing methods a kind replaces."""
    skip_append = {"_append": lambda self, pieces: (0, 0)}
    return {"no-appends": skip_append,
            "no-pieces": {**skip_append, "pieces": lambda self, slot, counts: []},
            "idle-writer": {"_write": _idle_write}}.get(kind, {})


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--json", metavar="FILE",
                   help="result file (default bench/results/hf-guard-ablation-SIZE-TOKENS.json)")
    a = p.parse_args()
    kinds = a.kinds.split(",")
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds or kinds[0] != "plain" or len(set(kinds)) != len(kinds):
        p.error(f"--kinds: plain first, then any of {', '.join(KINDS[1:])}, each once")
    if a.tokens < 8 or a.repeats < 1:
        p.error("--tokens must be >= 8 and --repeats >= 1")
    return a, kinds


def main() -> int:
    a, kinds = parse_args()
    import torch
    from transformers import StaticCache
    import hf_generate as H
    from concordia.handlers.async_checkpoint import CheckpointWriter
    from concordia.handlers.staging_ring import StagingRing
    from concordia.hf import GenerationGuard, cache_kwargs
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = H.build(a.size, device)
    ids = torch.randint(0, model.config.vocab_size, (1, 16),
                        generator=torch.Generator().manual_seed(1)).to(device)
    log = os.path.join(tempfile.mkdtemp(), "ablation.clog")
    real = {(cls, name): getattr(cls, name) for cls in (CheckpointWriter, StagingRing)
            for name in ("_append", "_write", "pieces") if hasattr(cls, name)}

    def once(kind: str) -> float:
        for (cls, name), f in real.items():
            setattr(cls, name, _patches(kind).get(name, f))
        if os.path.exists(log):
            os.remove(log)
        cache = StaticCache(config=model.config, max_cache_len=16 + a.tokens + 1)
        guard = GenerationGuard(cache, log) if kind != "plain" else None
        if device == "cuda":
            torch.cuda.synchronize()
        if kind == "no-gc":
            gc.disable()
        t = time.perf_counter()
        try:
            model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=a.tokens, do_sample=False,
                           stopping_criteria=[guard] if guard else [], pad_token_id=0)
            if device == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t) * 1e3
        finally:
            gc.enable()
            if guard is not None:
                guard.close()

    runs = {k: [] for k in kinds}
    try:
        for rep in range(a.repeats + 1):   # the first round warms up
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                ms = once(kind)
                if rep:
                    runs[kind].append(round(ms, 1))
    finally:
        for (cls, name), f in real.items():
            setattr(cls, name, f)
    plain = float(np.median(runs["plain"]))
    row = {k: {"ms_median": float(np.median(v)), "overhead_pct": round(100 * (np.median(v) / plain - 1), 1),
               "runs_ms": v} for k, v in runs.items()}
    env = environment(torch.cuda.get_device_name() if device == "cuda" else "cpu")
    write_result(f"hf-guard-ablation-{a.size}-{a.tokens}",
                 {"env": env, "size": a.size, "tokens": a.tokens, "repeats": a.repeats,
                  "kinds": row}, a.json)
    for k, r in row.items():
        print(f"{k:12s} {r['ms_median']:9.1f} ms  {r['overhead_pct']:+6.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The GenerationGuard's first call, by part: the guard opens its Checkpointer and reads the
base image on the first token of a generate call (the writer thread appends and commits it),
so that call takes milliseconds where the later ones take a fraction of one. Timers wrap what it calls (opening, the base image's reads
and appends, the commits) over whole generate calls, one StaticCache reset each call (as a
server keeps one).

    python bench/hf_first_call.py --size qwen3-0.6b --tokens 64 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from bench.common import environment, table, write_result  # noqa: E402

# (owner module, class, method) -> the part's name in the report
PARTS = (("concordia.hf", "GenerationGuard", "_open", "open"),
         ("concordia.handlers.checkpointer", "Checkpointer", "__init__", "checkpointer_init"),
         # the base: read on the first call and written by the writer thread, or (a base
         # over ASYNC_BASE_BYTES) written on the first call
         ("concordia.handlers.checkpointer", "Checkpointer", "_read_base", "base_read"),
         ("concordia.handlers.async_checkpoint", "CheckpointWriter", "_write_base", "base_write"),
         ("concordia.handlers.checkpointer", "Checkpointer", "checkpoint", "base_checkpoint"),
         ("concordia.handlers.checkpointer", "_WholeReads", "__init__", "base_plan"),
         ("concordia.handlers.checkpointer", "_WholeReads", "take", "base_reads"),
         ("concordia.handlers.log", "DeltaLog", "append_base", "base_appends"),
         ("concordia.handlers.log", "DeltaLog", "commit", "commits"))


class PartTimers:
    """Wall time and calls of each PARTS method, by wrapping it (base_write and the appends
    and commits run on the writer thread)."""

    def __init__(self):
        import importlib
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        for module, cls, method, part in PARTS:
            owner = getattr(importlib.import_module(module), cls)
            setattr(owner, method, self._timed(getattr(owner, method), part))

    def _timed(self, fn, part):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[part] += time.perf_counter() - t
                self.calls[part] += 1
        return timed

    def take(self) -> dict:
        out = {p: round(s * 1e3, 2) for p, s in self.seconds.items()}
        out.update({f"{p}_calls": n for p, n in self.calls.items()})
        self.seconds.clear(), self.calls.clear()
        return out


def main() -> int:
    import torch
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--name", default=None, help="result name (default hf-first-call-<size>-<tokens>)")
    a = p.parse_args()
    if a.tokens < 2 or a.repeats < 1:
        p.error(f"--tokens takes 2 or more and --repeats 1 or more, got {a.tokens} and {a.repeats}")
    from transformers import StaticCache
    import hf_generate as H
    from concordia.hf import GenerationGuard, cache_kwargs
    timers = PartTimers()
    model = H.build(a.size, a.device)
    ids = torch.randint(0, model.config.vocab_size, (1, 16),
                        generator=torch.Generator().manual_seed(1)).to(a.device)
    cache = StaticCache(config=model.config, max_cache_len=16 + a.tokens + 1)
    log = os.path.join(tempfile.mkdtemp(), "first.clog")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    def once() -> dict:
        cache.reset()
        if os.path.exists(log):
            os.remove(log)
        guard, calls = GenerationGuard(cache, log), []

        def criterion(input_ids, scores=None, **kw):
            t = time.perf_counter()
            out = guard(input_ids, scores, **kw)
            calls.append((time.perf_counter() - t) * 1e3)
            return out
        sync()
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=a.tokens, do_sample=False,
                       stopping_criteria=[criterion], pad_token_id=0)
        sync()
        guard.close()
        parts = timers.take()   # the base's parts happen in the first call only
        return {"first_call_ms": round(calls[0], 2), "second_call_ms": round(calls[1], 2), **parts}
    once()   # warm-up: kernels built, the ring's slots made (later calls take them)
    timers.take()
    rows = [once() for _ in range(a.repeats)]
    for r in rows:
        print(r, file=sys.stderr)
    env = environment(torch.cuda.get_device_name() if a.device == "cuda" else "cpu")
    write_result(a.name or f"hf-first-call-{a.size}-{a.tokens}",
                 {"env": env, "size": a.size, "tokens": a.tokens, "runs": rows,
                  "note": "parts are over the whole generate call; open, base_read (or "
                          "base_checkpoint) and base_plan are the first call's, base_write the "
                          "writer's; commits counts every token's"})
    print(table(rows, ["first_call_ms", "second_call_ms", "open", "base_read", "base_checkpoint",
                       "base_plan", "base_reads", "base_write", "base_appends"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

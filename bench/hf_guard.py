"""The GenerationGuard's cost on Hugging Face transformers' own generate: tokens/s without and
with a checkpoint every generated token, interleaved in one process. Reported twice: over the
whole generate call, and steady (from the 5th token on), since the guard's first two calls
(the base image, then the staging ring and its graphs) are a cost per call, not per token.

    python bench/hf_guard.py --size qwen3-0.6b --batch 1 --tokens 64 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from bench.common import environment, table, write_result  # noqa: E402


KINDS = ("plain", "guard", "calls", "calls-assign")   # --kinds


class Timed:
    """A stopping criterion (or none: `inner` None), its calls timed and stamped: the decode
    thread's time in the guard, and when each token came (the steady rate, apart from the
    guard's first calls: the base image, then the staging ring and its graphs)."""
    def __init__(self, inner, seconds: list):
        self.inner, self.seconds, self.at = inner, seconds, []

    def __call__(self, input_ids, scores=None, **kw):
        import torch
        t = time.perf_counter()
        out = self.inner(input_ids, scores, **kw) if self.inner is not None else torch.zeros(
            input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.at.append(t)
        self.seconds.append((time.perf_counter() - t) * 1e6)
        return out

    def steady_rate(self, batch: int) -> float:
        """Tokens/s from the 5th call on: the median gap between calls."""
        return batch / float(np.median(np.diff(self.at[4:])))


class HookOnly:
    """The guard's own tensor work at each call (the tokens so far and their count copied on
    the device), no checkpoint: what a stopping criterion of this kind costs by itself."""
    def __init__(self, assign: bool = False):
        self.tokens = self.meta = None
        self.assign = assign   # the count set by item assignment, as the guard did at first

    def __call__(self, input_ids, scores=None, **kw):
        import torch
        if self.tokens is None:
            self.tokens = torch.zeros(input_ids.shape[0], 4096, dtype=torch.int64,
                                      device=input_ids.device)
            self.meta = torch.zeros(8, dtype=torch.int64, device=input_ids.device)
        self.tokens[:, :input_ids.shape[1]].copy_(input_ids)
        if self.assign:
            self.meta[1] = input_ids.shape[1]
        else:
            self.meta[1:2].fill_(input_ids.shape[1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def parse_args(cuda: bool):
    """The command line, its --kinds checked (plain first, known kinds, each once)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reuse-cache", action="store_true",
                   help="one StaticCache for every generate call, reset before each (as a "
                        "server keeps one; the guard then takes the last guard's ring), "
                        "instead of a new one a call")
    p.add_argument("--kinds", default="plain,guard",
                   help="runs to compare: plain, guard, and calls (a stopping criterion doing "
                        "the guard's own tensor work, no checkpoint: what the hook alone costs; "
                        "calls-assign: the same with the count set by item assignment)")
    a = p.parse_args()
    kinds = a.kinds.split(",")
    if kinds[0] != "plain" or not set(kinds) <= set(KINDS) or len(set(kinds)) < len(kinds):
        p.error(f"--kinds takes plain first, then any of {', '.join(KINDS[1:])}, each once; "
                f"got {a.kinds!r}")
    return a, kinds


def main() -> int:
    import torch
    from transformers import StaticCache
    import hf_generate as H
    from concordia.hf import GenerationGuard, cache_kwargs
    a, kinds = parse_args(torch.cuda.is_available())
    model = H.build(a.size, a.device)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, 16),
                        generator=torch.Generator().manual_seed(1)).to(a.device)
    log = os.path.join(tempfile.mkdtemp(), "hf.clog")
    rates, steady, enqueue_us = {k: [] for k in kinds}, {k: [] for k in kinds}, []
    call_us, phases, busy, first_ms = [], {}, {}, []

    kept = StaticCache(config=model.config, max_cache_len=16 + a.tokens + 1) if a.reuse_cache else None

    def once(kind: str):
        cache = kept or StaticCache(config=model.config, max_cache_len=16 + a.tokens + 1)
        if kept is not None:
            cache.reset()
        inner = None
        if kind == "guard":
            if os.path.exists(log):
                os.remove(log)
            inner = GenerationGuard(cache, log)
        elif kind in ("calls", "calls-assign"):
            inner = HookOnly(assign=kind == "calls-assign")
        guard = Timed(inner, call_us if kind == "guard" else [])
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=a.tokens, do_sample=False,
                       stopping_criteria=[guard], pad_token_id=0)
        if a.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        steady[kind].append(guard.steady_rate(a.batch))
        if kind == "guard":
            first_ms.append([round(us / 1e3, 1) for us in guard.seconds[-len(guard.at):][:2]])
            g = guard.inner
            writer = g.ckpt._writer
            g.close()
            enqueue_us.extend(h.enqueue_s * 1e6 for h in g.handles[1:])
            for h in g.handles[1:]:
                for part, sec in h.phases.items():
                    phases.setdefault(part, []).append(sec * 1e6)
            for part, sec in (writer.busy.items() if writer else ()):
                busy[part] = busy.get(part, 0.0) + sec / (a.tokens * a.repeats)
        return a.tokens * a.batch / seconds
    for kind in kinds:   # warm-up
        once(kind)
    call_us.clear(), phases.clear(), busy.clear(), first_ms.clear()
    for v in steady.values():
        v.clear()
    for rep in range(a.repeats):
        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
            rates[kind].append(once(kind))
    row = {"size": a.size, "batch": a.batch, "tokens": a.tokens, "reuse_cache": a.reuse_cache,
           **{f"tok_s_{k}": round(float(np.median(v)), 2) for k, v in rates.items()},
           "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()}}
    # steady: from the 5th token on (the guard's first two calls, the base image and then the
    # staging ring with its graphs, are a cost per generate call, not per token)
    row.update({f"tok_s_steady_{k}": round(float(np.median(v)), 2) for k, v in steady.items()})
    for k in kinds[1:]:
        row[f"overhead_pct_{k}"] = round(100 * (1 - row[f"tok_s_{k}"] / row["tok_s_plain"]), 2)
        row[f"overhead_pct_steady_{k}"] = round(
            100 * (1 - row[f"tok_s_steady_{k}"] / row["tok_s_steady_plain"]), 2)
    if "guard" in kinds:
        row["overhead_pct"] = row["overhead_pct_guard"]
        row["guard_first_calls_ms"] = first_ms
        row.update(enqueue_us_median=round(float(np.median(enqueue_us)), 1),
                   guard_call_us_median=round(float(np.median(call_us)), 1),
                   enqueue_phases_us_median={k: round(float(np.median(v)), 1)
                                             for k, v in phases.items()},
                   writer_ms_per_token={k: round(v * 1e3, 3) for k, v in busy.items()})
    env = environment(torch.cuda.get_device_name() if a.device == "cuda" else "cpu")
    import transformers
    env.update(torch=torch.__version__, transformers=transformers.__version__)
    write_result(f"hf-guard-{a.size}" + ("-reuse" if a.reuse_cache else ""), {"env": env, **row})
    print(row)
    print(table([row], ["size", "batch", *(f"tok_s_{k}" for k in kinds),
                        *(f"overhead_pct_{k}" for k in kinds[1:]),
                        *(f"overhead_pct_steady_{k}" for k in kinds[1:]), "enqueue_us_median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

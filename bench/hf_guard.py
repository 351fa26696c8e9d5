"""The GenerationGuard's cost on Hugging Face transformers' own generate: tokens/s without and
with a checkpoint every generated token, interleaved in one process.

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


def main() -> int:
    import torch
    from transformers import StaticCache
    import hf_generate as H
    from concordia.hf import GenerationGuard
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    model = H.build(a.size, a.device)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, 16),
                        generator=torch.Generator().manual_seed(1)).to(a.device)
    log = os.path.join(tempfile.mkdtemp(), "hf.clog")
    rates, enqueue_us = {"plain": [], "guard": []}, []

    def once(guarded: bool):
        cache = StaticCache(config=model.config, max_cache_len=16 + a.tokens + 1)
        guard = None
        if guarded:
            if os.path.exists(log):
                os.remove(log)
            guard = GenerationGuard(cache, log)
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, past_key_values=cache, max_new_tokens=a.tokens, do_sample=False,
                       stopping_criteria=[guard] if guard else None, pad_token_id=0)
        if a.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        if guard:
            guard.close()
            enqueue_us.extend(h.enqueue_s * 1e6 for h in guard.handles[1:])
        return a.tokens * a.batch / seconds
    once(False), once(True)   # warm-up
    for rep in range(a.repeats):
        for kind in (("plain", "guard") if rep % 2 == 0 else ("guard", "plain")):
            rates[kind].append(once(kind == "guard"))
    row = {"size": a.size, "batch": a.batch, "tokens": a.tokens,
           "tok_s_plain": round(float(np.median(rates["plain"])), 2),
           "tok_s_guard": round(float(np.median(rates["guard"])), 2),
           "runs": {k: [round(x, 2) for x in v] for k, v in rates.items()},
           "enqueue_us_median": round(float(np.median(enqueue_us)), 1)}
    row["overhead_pct"] = round(100 * (row["tok_s_plain"] - row["tok_s_guard"]) / row["tok_s_plain"], 2)
    env = environment(torch.cuda.get_device_name() if a.device == "cuda" else "cpu")
    import transformers
    env.update(torch=torch.__version__, transformers=transformers.__version__)
    write_result(f"hf-guard-{a.size}", {"env": env, **row})
    print(table([row], ["size", "batch", "tok_s_plain", "tok_s_guard", "overhead_pct",
                        "enqueue_us_median"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

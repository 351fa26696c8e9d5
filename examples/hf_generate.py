"""Protect a Hugging Face `model.generate(...)` with Concordia: crash it, resume it.

    python examples/hf_generate.py --log run.clog --out want.npy                 # uninterrupted
    python examples/hf_generate.py --log run.clog --crash-after 12               # SIGKILLed
    python examples/hf_generate.py --log run.clog --resume --out got.npy         # continues

A Qwen3 model built from its configuration with random weights (no download): `tiny` for the
CPU box, `qwen3-0.6b` (Qwen3-0.6B's sizes) on a GPU. Greedy decoding, a StaticCache, and a
GenerationGuard as the stopping criterion: the resumed run's tokens equal the uninterrupted's.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from concordia.hf import GenerationGuard, cache_kwargs  # noqa: E402

SIZES = {"tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16),
         "qwen3-0.6b": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                            num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128)}


def build(size: str, device: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    # tiny: weights wide enough that every token depends on its context (a narrow random init
    # repeats one token); the 0.6B size keeps the usual init (bf16 activations stay finite)
    cfg = Qwen3Config(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True,
                      initializer_range=0.3 if size == "tiny" else 0.02)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return Qwen3ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


class CrashAfter:
    """A stopping criterion that SIGKILLs the process after n generated tokens."""
    def __init__(self, n: int, prompt: int):
        self.n, self.prompt = n, prompt

    def __call__(self, input_ids, scores, **kw):
        if input_ids.shape[1] - self.prompt >= self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main(argv=None) -> int:
    from transformers import StaticCache
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--log", help="the guard's delta log (no log: unprotected, for timing)")
    p.add_argument("--crash-after", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    model = build(a.size, a.device)
    if a.resume:
        t = time.perf_counter()
        ids, cache = GenerationGuard.resume(a.log, model, "cuda" if a.device == "cuda" else "reference")
        print(f"resumed with {ids.shape[1]} tokens in {(time.perf_counter() - t) * 1e3:.1f} ms")
    else:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, model.config.vocab_size, (a.batch, a.prompt), generator=g).to(a.device)
        cache = StaticCache(config=model.config, max_cache_len=a.prompt + a.tokens + 1)
        if a.log and os.path.exists(a.log):
            os.remove(a.log)
    guard = GenerationGuard(cache, a.log) if a.log else None
    criteria = [c for c in (guard, CrashAfter(a.crash_after, a.prompt) if a.crash_after else None) if c]
    left = a.prompt + a.tokens - ids.shape[1]
    t = time.perf_counter()
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=left, do_sample=False,
                         stopping_criteria=criteria, pad_token_id=0)
    seconds = time.perf_counter() - t
    if guard is not None:
        guard.close()
    print(f"{left} tokens x {a.batch} in {seconds:.2f} s ({left * a.batch / seconds:.1f} tok/s)")
    if a.out:
        np.save(a.out, out.cpu().numpy())
    return 0


if __name__ == "__main__":
    from concordia_ir.errors import ConcordiaError
    try:
        sys.exit(main())
    except ConcordiaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

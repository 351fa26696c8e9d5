"""A long decode with a checkpoint every step and background compaction: the log's size over
time (it must stay bounded), compactions, and recovery time at the end (from process start
with the model loaded to the first new token).

A serving loop: --rounds requests per slot, one after another in the same KV blocks (the
state stays the size of one round's; the log would grow without bound but for compaction).

    python bench/llm_long.py --config qwen3-0.6b --batch 8 --tokens 240 --rounds 40 --compact-at-mb 600
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

from bench.common import environment, write_result  # noqa: E402
from concordia import llm as L  # noqa: E402


def slow_steps(step_seconds: list, enqueue_s: list, over: float) -> dict:
    """Steps that took longer than `over` seconds: how many, the time they took past the
    median step, and how much of it the decode thread spent in checkpoint_async."""
    step, enq = np.array(step_seconds), np.array(enqueue_s)
    slow = step > over
    return {"count": int(slow.sum()), "excess_s": round(float((step[slow] - np.median(step)).sum()), 3),
            "in_checkpoint_async_s": round(float(enq[slow].sum()), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=240, help="tokens per request")
    p.add_argument("--rounds", type=int, default=1, help="requests per slot, one after another")
    p.add_argument("--compact-at-mb", type=int, default=600)
    p.add_argument("--slot-mb", type=int, default=64,
                   help="staging per ring slot and region, MiB: room to coalesce while the writer "
                        "waits behind the compaction's I/O (H100: 16 MiB 8.2 %%, 64 MiB 4.0 %%)")
    p.add_argument("--name", default=None)
    a = p.parse_args()
    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = os.path.join(tempfile.mkdtemp(prefix="concordia-long-"), "long.clog")
    common = ["--config", a.config, "--device", device, "--batch", str(a.batch), "--prompt", "16",
              "--tokens", str(a.tokens), "--rounds", str(a.rounds)]
    args = L.parse_args([*common, "--log", log, "--every", "1", "--async", "--when-full",
                         "coalesce", "--compact-at-mb", str(a.compact_at_mb),
                         "--slot-mb", str(a.slot_mb),
                         *(["--backend", a.backend] if a.backend else [])])
    # one model for the runs with and without checkpoints, as a server keeps one: on an H100 a
    # model made after another in a process decoded up to 12 % slower (bench/llm.py)
    run = L.DecodeRun(args)

    def plain_rate() -> float:   # the same loop, no checkpoints
        t0 = time.perf_counter()
        run.generate()
        return len(run.step_seconds) * a.batch / (time.perf_counter() - t0)
    run.generate(stop_after=4)   # warm: the graph captured (not in the plain rate)
    plain_runs = [plain_rate()]
    run.open_checkpointer()
    sizes, t0 = [], time.perf_counter()
    every = max(1, a.rounds * a.tokens // 200)   # about 200 samples

    def on_token(pos):
        if run.generated % every == 0:   # (steps so far, seconds, log bytes)
            sizes.append((len(run.step_seconds), round(time.perf_counter() - t0, 3),
                          os.path.getsize(log)))
    # stopped a few tokens short, as a crash would and as bench/llm.py's checkpointed runs
    # are: recovery then resumes mid-job, not at its last step
    run.generate(on_token=on_token, stop_after=a.rounds * a.tokens - 8)
    seconds = time.perf_counter() - t0
    writer = run.ckpt._writer
    run.close_checkpointer()
    steps = len(run.step_seconds)
    step_seconds, step_enqueue_s = run.step_seconds, run.step_enqueue_s
    enq = np.array([h.enqueue_s for h in run.handles])
    plain_runs.append(plain_rate())   # before and after: the device's pace drifts over a run
    plain_tok_s = float(np.mean(plain_runs))
    live = sum(t.numel() * t.element_size() for t in (run.model.kv, run.model.adapter, run.sched.state))
    # recovery: a new DecodeRun (the model is loaded) restores and makes its first token
    args_r = L.parse_args([*common, "--log", log, "--resume"])
    rec_run = L.DecodeRun(args_r)
    t = time.perf_counter()
    rec = rec_run.resume(a.backend or rec_run.default_backend())
    first = []
    rec_run.generate(start_pos=rec["restored_pos"], on_token=lambda pos: first.append(time.perf_counter()),
                     stop_after=1)
    recovery_s = first[0] - t
    result = {"env": environment(torch.cuda.get_device_name() if device == "cuda" else "cpu"),
              "config": a.config, "batch": a.batch, "rounds": a.rounds, "tokens_per_round": a.tokens,
              "steps": steps, "seconds": round(seconds, 2),
              "tok_s": round(steps * a.batch / seconds, 1), "tok_s_plain": round(plain_tok_s, 1),
              "tok_s_plain_before_after": [round(r, 1) for r in plain_runs],
              "overhead_pct": round(100 * (1 - steps * a.batch / seconds / plain_tok_s), 2),
              "compact_at_mb": a.compact_at_mb, "slot_mb": a.slot_mb,
              "max_coalesce": writer.max_coalesce if writer else None,
              "live_state_bytes": live,
              "step_ms_median": round(float(np.median(step_seconds)) * 1e3, 3),
              "step_ms_p99": round(float(np.percentile(step_seconds, 99)) * 1e3, 3),
              "step_ms_max": round(float(np.max(step_seconds)) * 1e3, 3),
              # where a slow step's time went: the decode thread in checkpoint_async (a full
              # ring: backpressure) or elsewhere (the device, the GIL)
              "slow_steps": slow_steps(step_seconds, step_enqueue_s, 10e-3),
              "enqueue_ms": {q: round(float(np.percentile(enq, p)) * 1e3, 3)
                             for q, p in (("median", 50), ("p99", 99), ("max", 100))},
              "writer_ms_per_step": {k: round(v * 1e3 / steps, 3) for k, v in writer.busy.items()},
              "log_bytes_max": max(s for _, _, s in sizes), "log_bytes_end": os.path.getsize(log),
              "compactions": writer.compactions, "log_size_over_time": sizes,
              "recovery": {k: round(v * 1e3, 2) for k, v in rec.items() if k.endswith("_s")},
              "recovery_to_first_token_ms": round(recovery_s * 1e3, 1)}
    path = write_result(a.name or f"llm-long-{a.config}", result)
    print({k: v for k, v in result.items() if k not in ("log_size_over_time", "env", "compactions")})
    print(f"{len(writer.compactions)} compactions; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

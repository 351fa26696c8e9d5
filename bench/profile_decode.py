"""Where a decode step's time goes, with and without per-step checkpoints (issue 15's first
step: why did a step slow from 25 to 58 ms in a checkpointed run?).

    python bench/profile_decode.py --config qwen3-0.6b --batch 1 --out DIR

For each mode (plain, checkpoint every step) it decodes, times every step in three parts
(enqueue: model.step returns; wait: the argmax's copy to the host; checkpoint call), and
records a torch.profiler trace of a few steady-state steps: the top ops by CPU and CUDA time
go to DIR/profile_<mode>.txt and the summary to DIR/profile_decode.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from concordia import llm as L  # noqa: E402


def between_steps(run, pos: int, gap: str):
    """What happens between two decode steps: a checkpoint, or a stand-in of the same length
    (sleep: the CPU idles; spin: the CPU stays busy; sync: a device synchronisation first)."""
    if run.ckpt is not None:
        run.checkpoint(pos)
        return
    if gap == "none":
        return
    kind, ms = gap.split(":")
    if kind.startswith("sync"):
        run.sync()
    end = time.perf_counter() + float(ms) / 1e3
    if kind.endswith("sleep"):
        time.sleep(float(ms) / 1e3)
    else:
        while time.perf_counter() < end:
            pass


def timed_generate(run, profile_steps: range, prof, gap: str = "none"):
    """run.generate with per-step phases: returns a list of dicts."""
    s, a, m = run.sched, run.args, run.model
    s.start(L.make_prompts(run.cfg, a.batch, a.prompt, a.seed))
    pos = 0
    s.ensure_block(0)
    s.publish()
    if run.ckpt is not None:
        run.checkpoint(0)
    m.seek(0)
    rows = []
    step_no = 0
    while pos < run.max_len - 1:   # one step at a time: the host waits for each step's tokens
        if s.ensure_block(pos):
            s.publish_table()
        if a.adapter_every and pos % a.adapter_every == 0 and pos > 0:
            m.adapter_update(pos)
        t0 = time.perf_counter()
        nxt_dev = m.launch()
        t1 = time.perf_counter()
        if run.scanner is not None and hasattr(run.scanner, "mark"):
            run.scanner.mark(s.table()[:, pos // a.block_size], np.full(a.batch, pos % a.block_size))
        nxt = nxt_dev.cpu().numpy()
        t2 = time.perf_counter()
        s.took(pos, nxt)
        pos += 1
        between_steps(run, pos, gap)
        t3 = time.perf_counter()
        rows.append({"pos": pos, "enqueue_ms": (t1 - t0) * 1e3, "wait_ms": (t2 - t1) * 1e3,
                     "ckpt_ms": (t3 - t2) * 1e3, "step_ms": (t2 - t0) * 1e3})
        step_no += 1
        if prof is not None and step_no in profile_steps:
            prof.step()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--out", default=tempfile.mkdtemp())
    p.add_argument("--no-graph", action="store_true", help="eager steps (the issue's baseline)")
    p.add_argument("--gaps", default="sleep:2,spin:2,sync_sleep:2,sleep:20,spin:20",
                   help="stand-ins run between plain steps (kind:ms), to tell the checkpoint's "
                        "own cost from what any pause between steps costs")
    args = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for mode in ("plain", "checkpoint", "plain_again"):
        log = os.path.join(tempfile.mkdtemp(), "p.clog") if mode == "checkpoint" else None
        a = L.parse_args(["--config", args.config, "--batch", str(args.batch), "--prompt", "8",
                     *(["--no-graph"] if args.no_graph else []),
                     "--tokens", str(args.tokens), *(["--log", log, "--every", "1"] if log else [])])
        run = L.DecodeRun(a)
        if log:
            run.open_checkpointer()
        timed_generate(run, range(0), None)            # warm-up (compile, allocator)
        if log:
            run.ckpt.close()
            os.remove(log)
            run = L.DecodeRun(a)
            run.open_checkpointer()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     schedule=schedule(wait=20, warmup=2, active=4, repeat=1)) as prof:
            rows = timed_generate(run, range(0, 10 ** 6), prof)
        if run.ckpt is not None:
            run.ckpt.close()
        steady = rows[10:]
        med = {k: float(np.median([r[k] for r in steady])) for k in ("enqueue_ms", "wait_ms",
                                                                    "ckpt_ms", "step_ms")}
        summary[mode] = med
        print(mode, {k: round(v, 2) for k, v in med.items()})
        with open(os.path.join(args.out, f"profile_{mode}.txt"), "w") as fh:
            ka = prof.key_averages()
            fh.write(ka.table(sort_by="self_cpu_time_total", row_limit=25))
            fh.write("\n\n")
            fh.write(ka.table(sort_by="self_cuda_time_total", row_limit=25))
    for gap in args.gaps.split(","):
        a = L.parse_args(["--config", args.config, "--batch", str(args.batch), "--prompt", "8",
                     *(["--no-graph"] if args.no_graph else []), "--tokens", str(args.tokens)])
        rows = timed_generate(L.DecodeRun(a), range(0), None, gap)[10:]
        summary["gap " + gap] = {k: float(np.median([r[k] for r in rows]))
                                 for k in ("enqueue_ms", "wait_ms", "step_ms")}
        print("gap", gap, {k: round(v, 2) for k, v in summary["gap " + gap].items()})
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(os.path.join(args.out, "profile_decode.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

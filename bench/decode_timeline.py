"""Where a decode step's time goes on the device, run by run (issue 15's profile): the step
graph's device time, the read-back of its tokens, the checkpoint's capture, the device idle
before the next step (CUDA events around each), the decode thread's time in
checkpoint_async, and each run's tok/s. Runs are P (plain) or A (checkpoint_async every
step), in the order given, on one kept model (--models kept, as a server keeps one) or on a
fresh model each (--models fresh, how bench/llm.py measured until session 6).

    python bench/decode_timeline.py --batch 1 --runs P,A,P,A,P,A
    python bench/decode_timeline.py --batch 1 --runs P,P,P,P --models fresh

What it found on an H100: with a fresh model a run, every model after the first replayed
its graph ~12 % slower (3.02 against 2.68 ms a step, plain or not; a kept model stayed fast
until a second fresh one was made); and the capture (35 us at batch 1, 50 at batch 8) sat
between the read-back and the next step, not beside the host's turn-around.
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

from bench.common import environment, table, write_result  # noqa: E402
from bench.llm import run_kind  # noqa: E402

PARTS = ("graph_us", "readback_us", "capture_us", "idle_us", "step_us", "enqueue_us")


class StepEvents:
    """CUDA events around each replayed step, its read-back and its capture (patched into
    the decode loop's three calls for the life of the object)."""

    def __init__(self, L):
        import torch
        self.torch, self.L, self.steps, self.cur = torch, L, [], {}
        self.orig = L.Qwen3Decoder.launch, L.Qwen3Decoder.read_back, L.DecodeRun.checkpoint_async
        launch, read_back, checkpoint_async = self.orig
        ev = self.event

        def timed_launch(model, tokens, pos):
            if model.graph is None:    # the eager warm-up and capture: not a step to time
                return launch(model, tokens, pos)
            self.cur = {"g0": ev()}
            self.steps.append(self.cur)
            out = launch(model, tokens, pos)
            self.cur["g1"] = ev()
            return out

        def timed_read_back(model, out):
            done = read_back(model, out)
            self.cur["rb"] = ev()
            return done

        def timed_checkpoint(run, pos):
            t = time.perf_counter()
            checkpoint_async(run, pos)
            self.cur["ck"], self.cur["enq"] = ev(), time.perf_counter() - t
        L.Qwen3Decoder.launch, L.Qwen3Decoder.read_back = timed_launch, timed_read_back
        L.DecodeRun.checkpoint_async = timed_checkpoint

    def event(self):
        e = self.torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def medians(self, skip: int) -> dict:
        """Each part's median over the steps past the first `skip` (us)."""
        self.torch.cuda.synchronize()
        rows = []
        for a, b in zip(self.steps[skip:-1], self.steps[skip + 1:]):
            if "rb" not in a:
                continue
            last = a.get("ck", a["rb"])
            rows.append((a["g0"].elapsed_time(a["g1"]), a["g1"].elapsed_time(a["rb"]),
                         a["rb"].elapsed_time(a["ck"]) if "ck" in a else 0.0,
                         last.elapsed_time(b["g0"]), a["g0"].elapsed_time(b["g0"]),
                         a.get("enq", 0.0) * 1e3))
        return {k: round(float(v) * 1e3, 1) for k, v in zip(PARTS, np.median(np.array(rows), axis=0))}

    def close(self):
        self.L.Qwen3Decoder.launch, self.L.Qwen3Decoder.read_back = self.orig[:2]
        self.L.DecodeRun.checkpoint_async = self.orig[2]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", default="P,A,P,A,P,A", help="P (plain) and A (checkpointed), in order")
    p.add_argument("--models", choices=("kept", "fresh"), default="kept")
    p.add_argument("--name", default=None)
    a = p.parse_args()
    a.kinds = a.runs.split(",")
    if not a.kinds or set(a.kinds) - {"P", "A"}:
        p.error(f"--runs takes P and A separated by commas, got {a.runs!r}")
    if a.batch < 1 or a.tokens < 24:
        p.error("--batch must be >= 1 and --tokens >= 24 (the first 16 steps are not timed)")
    import torch
    if not torch.cuda.is_available():
        p.error("needs a CUDA device (the timeline is CUDA events around a CUDA graph's replays)")
    return a


def main() -> int:
    a = parse_args()
    import torch
    from concordia import llm as L
    log = os.path.join(tempfile.mkdtemp(prefix="concordia-timeline-"), "t.clog")
    base = ["--config", a.config, "--device", "cuda", "--prompt", "32", "--tokens", str(a.tokens),
            "--batch", str(a.batch)]
    new_run = lambda: L.DecodeRun(L.parse_args(base))   # noqa: E731
    kept = new_run() if a.models == "kept" else None
    (kept or new_run()).generate(stop_after=4)   # warm: the graph captured, kernels loaded
    events, rows = StepEvents(L), []
    try:
        for i, kind in enumerate(a.kinds):
            events.steps.clear()
            _, rate = run_kind(kept or new_run(), "async" if kind == "A" else "plain", log, None,
                               stop_after=a.tokens - 8)
            rows.append({"run": i, "kind": kind, "tok_s": round(rate, 1),
                         **events.medians(skip=16)})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        events.close()
    env = environment(torch.cuda.get_device_name())
    env.update(torch=torch.__version__)
    write_result(a.name or f"decode-timeline-{a.config}-b{a.batch}-{a.models}",
                 {"env": env, "config": a.config, "batch": a.batch, "tokens": a.tokens,
                  "models": a.models, "rows": rows})
    print(table(rows, ["run", "kind", "tok_s", *PARTS]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a decode step's time goes on the device, run by run (issue 15's profile): the step
graph's device time, the read-back of its tokens, the checkpoint's capture, the device idle
before the next step (CUDA events around each), the decode thread's time in
checkpoint_async, and each run's tok/s. Runs are P (plain) or A (checkpoint_async every
step), in the order given, on one kept model (--models kept, as a server keeps one) or on a
fresh model each (--models fresh, how bench/llm.py measured until session 6). N is A with a
writer that logs nothing (it waits for each capture and frees its slot): the device capture
and the enqueue without the writer's Python, to tell them from its contention for the GIL.
F is A with the KV gather forked onto a side stream (device_side="fork").

The host's clocks too: the turn-around (the step's tokens in hand to the next step's graph
launched; negative since session 9's loop enqueues the next step before it reads a step's
tokens), the time in launch(), and how many turn-arounds the writer was appending in
(holding the GIL, or asking for it, while the decode thread needs it). --switch-interval sets
Python's sys.setswitchinterval for the run (a GIL holder is asked to drop it after that long).

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
HOST_PARTS = ("turn_us", "launch_us", "writer_in_turn")


class StepEvents:
    """CUDA events around each replayed step, its read-back and its capture (patched into
    the decode loop's three calls for the life of the object)."""

    def __init__(self, L):
        import torch
        from concordia.handlers.async_checkpoint import CheckpointWriter
        self.torch, self.L, self.steps, self.cur = torch, L, [], {}
        self.writes: list = []   # the writer's (start, end) host times in _write
        self.orig = L.Qwen3Decoder.launch, L.Qwen3Decoder.read_back, L.DecodeRun.checkpoint_async
        self.orig_write = CheckpointWriter._write
        launch, read_back, checkpoint_async = self.orig
        ev, write = self.event, self.orig_write

        def timed_launch(model):
            if model.graph is None:    # the eager warm-up and capture: not a step to time
                return launch(model)
            t = time.perf_counter()
            self.cur = {"g0": ev(), "h0": t}
            self.steps.append(self.cur)
            out = launch(model)
            self.cur["g1"], self.cur["h1"] = ev(), time.perf_counter()
            return out

        def timed_read_back(model, out):
            done = read_back(model, out)
            self.cur["rb"] = ev()
            cur = self.cur

            def tokens():
                got = done()
                cur["tok"] = time.perf_counter()
                return got
            return tokens

        def timed_write(writer, cap):
            t = time.perf_counter()
            try:
                return write(writer, cap)
            finally:
                self.writes.append((t, time.perf_counter()))
        CheckpointWriter._write = self.timed_write = timed_write

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
        out = {k: round(float(v) * 1e3, 1) for k, v in zip(PARTS, np.median(np.array(rows), axis=0))}
        return {**out, **self.host_medians(skip)}

    def host_medians(self, skip: int) -> dict:
        """The host's turn-around and launch() (us, medians), and the share of turn-arounds
        that a writer's _write overlapped."""
        turns, launches, hit = [], [], 0
        starts = np.array([w[0] for w in self.writes]) if self.writes else np.zeros(0)
        ends = np.array([w[1] for w in self.writes]) if self.writes else np.zeros(0)
        for a, b in zip(self.steps[skip:-1], self.steps[skip + 1:]):
            if "tok" not in a:
                continue
            turns.append(b["h1"] - a["tok"])
            launches.append(b["h1"] - b["h0"])
            lo, hi = min(a["tok"], b["h1"]), max(a["tok"], b["h1"])
            hit += bool(np.any((starts < hi) & (ends > lo)))
        return {"turn_us": round(float(np.median(turns)) * 1e6, 1),
                "launch_us": round(float(np.median(launches)) * 1e6, 1),
                "writer_in_turn": round(hit / max(1, len(turns)), 3)}

    def close(self):
        from concordia.handlers.async_checkpoint import CheckpointWriter
        self.L.Qwen3Decoder.launch, self.L.Qwen3Decoder.read_back = self.orig[:2]
        self.L.DecodeRun.checkpoint_async = self.orig[2]
        CheckpointWriter._write = self.orig_write


def no_log_write(writer, cap):
    """Kind N's writer: waits for the capture and frees its slot, logs nothing."""
    from concordia.handlers.regions import CheckpointStats
    writer.backend.wait_event(cap.event)
    writer.free.put(cap.slot)
    cap.released = True
    cap.handle.stats = CheckpointStats(cap.id, 0, 0, 0.0, False)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runs", default="P,A,P,A,P,A",
                   help="P (plain), A (checkpointed), N (checkpointed, the writer logs nothing), "
                        "F (checkpointed, the gather forked), in order")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="sys.setswitchinterval for the runs, seconds (Python's default: 0.005)")
    p.add_argument("--models", choices=("kept", "fresh"), default="kept")
    p.add_argument("--name", default=None)
    a = p.parse_args()
    a.kinds = a.runs.split(",")
    if not a.kinds or set(a.kinds) - {"P", "A", "N", "F"}:
        p.error(f"--runs takes P, A, N and F separated by commas, got {a.runs!r}")
    if a.switch_interval is not None and not 0 < a.switch_interval <= 1:
        p.error(f"--switch-interval is seconds in (0, 1], got {a.switch_interval}")
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
    if a.switch_interval is not None:
        sys.setswitchinterval(a.switch_interval)
    from concordia.handlers.async_checkpoint import CheckpointWriter
    events, rows = StepEvents(L), []
    try:
        for i, kind in enumerate(a.kinds):
            events.steps.clear()
            events.writes.clear()
            CheckpointWriter._write = no_log_write if kind == "N" else events.timed_write
            _, rate = run_kind(kept or new_run(), {"P": "plain", "F": "fork"}.get(kind, "async"), log, None,
                               stop_after=a.tokens - 8)
            rows.append({"run": i, "kind": kind, "tok_s": round(rate, 1),
                         **events.medians(skip=16)})
            print(rows[-1], file=sys.stderr, flush=True)
    finally:
        events.close()
    env = environment(torch.cuda.get_device_name())
    env.update(torch=torch.__version__, switch_interval=sys.getswitchinterval())
    write_result(a.name or f"decode-timeline-{a.config}-b{a.batch}-{a.models}",
                 {"env": env, "config": a.config, "batch": a.batch, "tokens": a.tokens,
                  "models": a.models, "rows": rows})
    print(table(rows, ["run", "kind", "tok_s", *PARTS, *HOST_PARTS]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's workload: a Qwen3 decode loop with and without per-step delta checkpoints.

    python bench/llm.py --config qwen3-0.6b --device cuda --backend cuda      # the GPU run
    python bench/llm.py --config tiny --device cpu --backend reference        # a CPU smoke run

For each batch size: decode tokens/s without checkpoints and with one checkpoint per decode
step (KV pages from the block table, adapter pages by device shadow compare, scheduler
state), the checkpoint time per step (median, p99), bytes per checkpoint, and recovery split
into the paper's phases: detect (scan the log for its last commit), load log (the committed
page image), apply (the DeltaApplier writes the pages into the new process's tensors) and
resume (the first token after recovery). JSON and a PNG plot go to bench/results/.

Every kind of run at a batch size uses one model, cache and CUDA graph, as a server keeps
one: on an H100 a model made after another in the process decoded ~12 % slower, whatever
the checkpoints (docs/checkpointing.md), which swamped a 2 % comparison.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.common import environment, table, write_result  # noqa: E402

PAPER = {"tokens_per_s": 108.2, "checkpoint_overhead_ms": 18.9, "overhead_fraction": "< 4 %"}


ASYNC_KINDS = {"async": "stream", "fork": "fork", "ring": "ring", "auto": "auto"}   # checkpoint_async runs: their device side


def run_kind(run, kind: str, log: str, backend: str | None, stop_after: int | None = None):
    """One generate on `run` as `kind`: plain (no checkpoints), async/ring (checkpoint_async
    every step, the gather in the decode stream or on the persistent kernel) or sync
    (checkpoint() every step). Returns (the checkpointer's writer, the steady tok/s)."""
    a = run.args
    a.log, a.every, a.backend = (log if kind != "plain" else None), 1, backend
    a.async_checkpoints = kind in ASYNC_KINDS
    a.device_side = ASYNC_KINDS.get(kind, "stream")
    if a.log:
        if os.path.exists(log):
            os.remove(log)
        run.open_checkpointer()
    stamps = []
    run.generate(on_token=lambda pos: stamps.append(time.perf_counter()), stop_after=stop_after)
    writer = run.ckpt and run.ckpt._writer   # its busy time, read after the close
    run.close_checkpointer()   # async: waits for the writer (after the stamps: not in the rate)
    # steady state: from the first generated token to the last (prompt and base image excluded)
    steady = (len(stamps) - 1) * a.batch / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return writer, steady


def recovery(L, base_args, batch, log, backend):
    args = L.parse_args([*base_args, "--batch", str(batch), "--log", log, "--resume"])
    run = L.DecodeRun(args)
    rec = run.resume(backend or run.default_backend())
    t = time.perf_counter()
    first = []
    run.generate(start_pos=rec["restored_pos"], on_token=lambda pos: first.append(time.perf_counter() - t))
    rec["resume_s"] = first[0] if first else 0.0
    rec["total_s"] = rec["detect_s"] + rec["load_log_s"] + rec["apply_s"] + rec["resume_s"]
    return rec


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    b = [r["batch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"plain": "no checkpoints", "async": "checkpoint_async every step",
              "ring": "checkpoint_async, gather on the ring",
              "fork": "checkpoint_async, gather forked", "sync": "checkpoint() every step"}
    for kind, mark in (("plain", "o-"), ("async", "s-"), ("fork", "x-"), ("ring", "d-"), ("sync", "^--")):
        if f"tok_s_{kind}" in rows[0]:
            a1.plot(b, [r[f"tok_s_{kind}"] for r in rows], mark, label=labels[kind])
    a1.set_xlabel("batch size")
    a1.set_ylabel("tokens / s")
    a1.set_xscale("log", base=2)
    a1.legend()
    a1.set_title("decode throughput")
    for kind, mark in (("async", "s"), ("fork", "x"), ("ring", "d")):
        sfx = "" if kind == "async" else "_" + kind   # async_stats' keys
        if f"enqueue_us_median{sfx}" in rows[0]:
            a2.plot(b, [r[f"enqueue_us_median{sfx}"] / 1e3 for r in rows], mark + "-",
                    label=f"{kind}: decode thread")
            a2.plot(b, [r[f"lag_ms_median{sfx}"] for r in rows], mark + ":",
                    label=f"{kind}: enqueue to durable")
    if "ckpt_ms_median" in rows[0]:
        a2.plot(b, [r["ckpt_ms_median"] for r in rows], "^--", label="checkpoint(): decode thread")
    a2.set_xlabel("batch size")
    a2.set_ylabel("ms per checkpoint (median)")
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.legend()
    a2.set_title("checkpoint cost per decode step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def async_stats(hs, busy: dict, steps: int, suffix: str) -> dict:
    """A checkpoint_async kind's figures (keys end in `suffix`): the decode thread's time in
    the call, durability lag, bytes, the writer's time by part."""
    enq = np.array([h.enqueue_s for h in hs]) * 1e6
    lag = [h.lag_s for h in hs]
    out = dict(enqueue_us_median=round(float(np.median(enq)), 1),
               enqueue_us_p99=round(float(np.percentile(enq, 99)), 1),
               lag_ms_median=round(float(np.median(lag)) * 1e3, 3),
               lag_ms_p99=round(float(np.percentile(lag, 99)) * 1e3, 3),
               lag_checkpoints_median=float(np.median([h.lag_checkpoints for h in hs])),
               bytes_per_step=int(np.median([h.stats.bytes for h in hs])),
               pages_per_step=int(np.median([h.stats.pages for h in hs])),
               group_commit_checkpoints=len(hs),
               writer_ms_per_step={k: round(v * 1e3 / max(1, steps), 3) for k, v in busy.items()})
    return {k + suffix: v for k, v in out.items()}


class GCPauses:
    """Python's garbage collections while it is installed: (generation, seconds) each. A
    collection holds the GIL, so it stops the decode thread and the writer alike."""

    def __init__(self):
        self.pauses: list = []
        self._t0 = 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict):
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._t0))

    def take(self) -> dict:
        """The collections since the last take: how many of the oldest generation, and the
        longest pause (ms)."""
        got, self.pauses = self.pauses, []
        return dict(gc_full=sum(g == 2 for g, _ in got),
                    gc_ms_max=round(max((s for _, s in got), default=0.0) * 1e3, 2))

    def close(self):
        gc.callbacks.remove(self._note)


def repeat_detail(hs, writer, rate: float) -> dict:
    """One checkpointed run's own figures, to tell what a slow run had that the others did not:
    its rate, the decode thread's time in checkpoint_async (median and most), of that the
    time spent getting a staging slot (made, or waited for: backpressure), durability lag,
    and the writer's time by part (ms over the run)."""
    enq = np.array([h.enqueue_s for h in hs]) * 1e6 if hs else np.zeros(1)
    slot = sum(h.phases.get("slot", 0.0) for h in hs)
    # the slowest call's parts: where a stall of the decode thread sat (a slot, the graph's
    # launch, the event; the rest of enqueue_us_max is the GIL or the OS)
    worst = max(hs, key=lambda h: h.enqueue_s).phases if hs else {}
    return dict(tok_s=round(rate, 1), enqueue_us_median=round(float(np.median(enq)), 1),
                enqueue_us_max=round(float(enq.max()), 1), slot_ms=round(slot * 1e3, 2),
                lag_ms_median=round(float(np.median([h.lag_s for h in hs])) * 1e3, 3) if hs else 0.0,
                writer_ms={k: round(v * 1e3, 1) for k, v in writer.busy.items()},
                slowest_enqueue_ms={k: round(v * 1e3, 3) for k, v in worst.items()})


def repeat_overheads(plain: list, other: list) -> list:
    """Percent overhead of each repeat's run against the same repeat's plain run."""
    return [round(100 * (p - o) / p, 2) for p, o in zip(plain, other) if p > 0]


def measure_batch(L, a, base, batch, kinds, log) -> dict:
    """The kinds of run interleaved on one model, cache and CUDA graph (a server keeps one),
    `repeats` times each, in a rotating order. Runs on models made one after another were not
    comparable: on an H100 a fresh model's graph replayed in 2.68 ms a step, and every later
    one's, plain or not, in 3.02 ms (bench/results/llm-drift-*). Checkpointed runs stop 8 tokens
    short, as a crash would, so that recovery has tokens left to make (it uses the last log)."""
    run = L.DecodeRun(L.parse_args([*base, "--batch", str(batch)]))
    for kind in kinds:   # warm-up: the graph captured, kernels loaded, the allocator primed
        run_kind(run, kind, log, a.backend, stop_after=8)
    rates = {k: [] for k in kinds}
    step_s = {k: [] for k in kinds}
    stats, handles, busy, busy_steps, details = {}, {}, {}, {}, {}
    pauses, gcs = GCPauses(), {k: [] for k in kinds}
    for rep in range(a.repeats):
        order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
        for kind in order:
            writer, rate = run_kind(run, kind, log, a.backend,
                                    stop_after=a.tokens - 8 if kind != "plain" else None)
            rates[kind].append(rate)
            gcs[kind].append(pauses.take())
            step_s[kind] += run.step_seconds
            stats[kind] = run.stats
            if kind in ASYNC_KINDS:
                hs = [h for h in run.handles if h.stats is not None]
                handles.setdefault(kind, []).extend(hs)
                details.setdefault(kind, []).append(repeat_detail(hs, writer, rate))
                for part, sec in writer.busy.items():   # the writer's time by part
                    busy.setdefault(kind, {})
                    busy[kind][part] = busy[kind].get(part, 0.0) + sec
                busy_steps[kind] = busy_steps.get(kind, 0) + len(run.step_seconds)
    pauses.close()
    row = {"batch": batch}
    for k in kinds:
        row[f"gc_{k}_repeats"] = gcs[k]   # Python's collections in each run (GCPauses)
        row[f"tok_s_{k}"] = round(float(np.median(rates[k])), 1)
        row[f"decode_step_ms_{k}"] = round(float(np.median(step_s[k])) * 1e3, 3)
        row[f"tok_s_{k}_runs"] = [round(r, 1) for r in rates[k]]
    plain = row.get("tok_s_plain")
    for k in kinds:
        if k != "plain" and plain:
            row[f"overhead_pct_{k}"] = round(100 * (plain - row[f"tok_s_{k}"]) / plain, 2)
            # each repeat's own pair (its plain run and this kind's, a few seconds apart): their
            # spread is the noise the medians above sit in
            row[f"overhead_pct_{k}_repeats"] = repeat_overheads(rates["plain"], rates[k])
    for kind in (k for k in kinds if k in ASYNC_KINDS):
        row.update(async_stats(handles[kind], busy[kind], busy_steps[kind],
                               "" if kind == "async" else "_" + kind))
        row[f"repeat_detail_{kind}"] = details[kind]
    if "sync" in kinds:
        steps = [s for s in stats["sync"] if not s["full"]]
        ms = np.array([s["seconds"] for s in steps]) * 1e3
        row.update(ckpt_ms_median=round(float(np.median(ms)), 3),
                   ckpt_ms_p99=round(float(np.percentile(ms, 99)), 3),
                   bytes_per_ckpt=int(np.median([s["bytes"] for s in steps])))
    last = next((k for k in ("async", "fork", "ring", "sync") if k in kinds), None)
    if last:
        row["base_image_bytes"] = stats[last][0].get("bytes")
        row["recovery_ms"] = {k[:-2]: round(v * 1e3, 2) for k, v in
                              recovery(L, base, batch, log, a.restore_backend or a.backend).items()
                              if k.endswith("_s")}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None, help="Concordia backend of the checkpoints")
    p.add_argument("--restore-backend", default=None)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--fsync", default="always")
    p.add_argument("--repeats", type=int, default=2, help="runs of each kind per batch size")
    p.add_argument("--name", default=None, help="result name (default llm-<config>)")
    p.add_argument("--kinds", default="plain,async,sync",
                   help="runs to compare: plain (no checkpoints), async (checkpoint_async every "
                        "step, its gather in the decode stream), fork (the same, its KV gather "
                        "on a side stream), ring (its KV gather on the persistent kernel), sync (checkpoint() every step)")
    p.add_argument("--no-graph", action="store_true", help="eager decode steps (no CUDA graph)")
    p.add_argument("--when-full", default="wait", choices=["wait", "coalesce"])
    p.add_argument("--ahead", type=int, default=None,
                   help="decode steps enqueued before the host waits for a step's tokens "
                        "(default: the decode loop's)")
    p.add_argument("--page-size", type=int, default=0,
                   help="the log's page in bytes (default: the decode loop's, about a KV row)")
    a = p.parse_args(argv)
    if "ring" in a.kinds.split(","):   # ring_gather's condition, for every kind alike
        os.environ.setdefault("CUDA_MODULE_LOADING", "EAGER")
    import torch
    from concordia import llm as L
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = [*(["--no-graph"] if a.no_graph else []), "--config", a.config, "--device", device,
            "--when-full", a.when_full, "--prompt", str(a.prompt), "--tokens", str(a.tokens),
            "--page-size", str(a.page_size), "--fsync", a.fsync,
            *(["--ahead", str(a.ahead)] if a.ahead is not None else [])]
    kinds = a.kinds.split(",")
    with tempfile.TemporaryDirectory(prefix="concordia-llm-") as tmp:
        log = os.path.join(tmp, "decode.clog")
        rows = []
        for batch in (int(x) for x in a.batches.split(",")):
            rows.append(measure_batch(L, a, base, batch, kinds, log))
            print(f"batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
    env = environment(torch.cuda.get_device_name() if device == "cuda" else "cpu")
    env.update(torch=torch.__version__)
    name = a.name or f"llm-{a.config}"
    result = {"env": env, "config": a.config, "backend": a.backend or "default",
              "prompt": a.prompt, "tokens": a.tokens, "fsync": a.fsync, "kinds": kinds,
              "cuda_graph": not a.no_graph, "page_size": a.page_size, "repeats": a.repeats,
              "when_full": a.when_full, "ahead": L.parse_args(base).ahead,
              "checkpoint_every_steps": 1, "paper": PAPER,
              "targets": {"overhead_pct": "< 2", "recovery_s": "< 1.5"}, "rows": rows}
    path = write_result(name, result)
    try:
        plot(rows, path[:-5] + ".png", f"Concordia, {a.config} on {env['device']}")
    except ImportError:
        print("note: matplotlib is not installed; no plot", file=sys.stderr)
    cols = ["batch"] + [f"tok_s_{k}" for k in kinds] + [f"overhead_pct_{k}" for k in kinds
                                                       if k != "plain"]
    cols += [c for c in ("enqueue_us_median", "enqueue_us_p99", "lag_ms_median",
                         "lag_checkpoints_median", "ckpt_ms_median", "bytes_per_step")
             if any(c in r for r in rows)]
    print(table([{**r, "recovery_ms": r.get("recovery_ms", {}).get("total")} for r in rows],
                cols + ["recovery_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's workload: a Qwen3 decode loop with and without per-step delta checkpoints.

    python bench/llm.py --config qwen3-0.6b --device cuda --backend cuda      # the GPU run
    python bench/llm.py --config tiny --device cpu --backend reference        # a CPU smoke run

For each batch size: decode tokens/s without checkpoints and with one checkpoint per decode
step (KV pages from the block table, adapter pages by device shadow compare, scheduler
state), the checkpoint time per step (median, p99), bytes per checkpoint, and recovery split
into the paper's phases: detect (scan the log for its last commit), load log (the committed
page image), apply (the DeltaApplier writes the pages into the new process's tensors) and
resume (the first token after recovery). JSON and a PNG plot go to bench/results/.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from bench.common import environment, table, write_result  # noqa: E402

PAPER = {"tokens_per_s": 108.2, "checkpoint_overhead_ms": 18.9, "overhead_fraction": "< 4 %"}


def run_one(L, base_args: list[str], batch: int, log: str | None, every: int, backend: str | None,
            stop_after: int | None = None):
    args = L.parse([*base_args, "--batch", str(batch),
                    *(["--log", log, "--every", str(every)] if log else []),
                    *(["--backend", backend] if backend else [])])
    run = L.DecodeRun(args)
    if log:
        if os.path.exists(log):
            os.remove(log)
        run.open_checkpointer()
    stamps = []
    t0 = time.perf_counter()
    run.generate(on_token=lambda pos: stamps.append(time.perf_counter()), stop_after=stop_after)
    total = time.perf_counter() - t0
    if run.ckpt is not None:
        run.ckpt.close()
    # steady state: from the first generated token to the last (prompt and base image excluded)
    steady = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return run, total, steady


def recovery(L, base_args, batch, log, backend):
    args = L.parse([*base_args, "--batch", str(batch), "--log", log, "--resume"])
    run = L.DecodeRun(args)
    rec = run.resume(backend)
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
    a1.plot(b, [r["tok_s_plain"] for r in rows], "o-", label="no checkpoints")
    a1.plot(b, [r["tok_s_ckpt"] for r in rows], "s-", label="checkpoint every step")
    a1.set_xlabel("batch size")
    a1.set_ylabel("tokens / s")
    a1.set_xscale("log", base=2)
    a1.legend()
    a1.set_title("decode throughput")
    a2.plot(b, [r["ckpt_ms_median"] for r in rows], "o-", label="median")
    a2.plot(b, [r["ckpt_ms_p99"] for r in rows], "^--", label="p99")
    a2.set_xlabel("batch size")
    a2.set_ylabel("ms per checkpoint")
    a2.set_xscale("log", base=2)
    a2.legend()
    a2.set_title("checkpoint time per decode step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    a = p.parse_args(argv)
    import torch
    import llm_decode as L
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = ["--config", a.config, "--device", device, "--prompt", str(a.prompt),
            "--tokens", str(a.tokens), "--fsync", a.fsync]
    with tempfile.TemporaryDirectory(prefix="concordia-llm-") as tmp:
        log = os.path.join(tmp, "decode.clog")
        run_one(L, [*base[:-4], "--tokens", "8", "--fsync", a.fsync], 1, log, 1, a.backend)  # warm-up
        rows = []
        for batch in (int(x) for x in a.batches.split(",")):
            # alternate the two kinds of run, first one then the other (clocks and caches warm
            # up as a process goes on); the checkpointed runs stop 8 tokens short, as a crash
            # would, so that recovery has tokens left to make (it uses the last log)
            plains, ckpts, step_ms = [], [], {"plain": [], "ckpt": []}
            for rep in range(a.repeats):
                for kind in (("ckpt", "plain") if rep % 2 == 0 else ("plain", "ckpt")):
                    if kind == "ckpt":
                        run, _, rate = run_one(L, base, batch, log, 1, a.backend,
                                               stop_after=a.tokens - 8)
                        ckpts.append(rate)
                        step_ms["ckpt"] += run.step_seconds
                    else:
                        prun, _, prate = run_one(L, base, batch, None, 0, None)
                        plains.append(prate)
                        step_ms["plain"] += prun.step_seconds
            plain, ckpt = float(np.median(plains)), float(np.median(ckpts))
            steps = [s for s in run.stats if not s["full"]]
            ms = np.array([s["seconds"] for s in steps]) * 1e3
            rec = recovery(L, base, batch, log, a.restore_backend or a.backend)   # the last log
            rows.append({
                "batch": batch, "tok_s_plain": round(plain, 1), "tok_s_ckpt": round(ckpt, 1),
                "overhead_pct": round(100 * (plain - ckpt) / plain, 2) if plain else None,
                "decode_step_ms_plain": round(float(np.median(step_ms["plain"])) * 1e3, 2),
                "decode_step_ms_ckpt_run": round(float(np.median(step_ms["ckpt"])) * 1e3, 2),
                "ckpt_ms_median": round(float(np.median(ms)), 3),
                "ckpt_ms_p99": round(float(np.percentile(ms, 99)), 3),
                "bytes_per_ckpt": int(np.median([s["bytes"] for s in steps])),
                "pages_per_ckpt": int(np.median([s["pages"] for s in steps])),
                "base_image_bytes": run.stats[0]["bytes"],
                "recovery_ms": {k[:-2]: round(v * 1e3, 2) for k, v in rec.items() if k.endswith("_s")},
            })
            print(f"batch {batch}: {rows[-1]}", file=sys.stderr, flush=True)
    env = environment(torch.cuda.get_device_name() if device == "cuda" else "cpu")
    env.update(torch=torch.__version__)
    name = a.name or f"llm-{a.config}"
    result = {"env": env, "config": a.config, "backend": a.backend or "default",
              "prompt": a.prompt, "tokens": a.tokens, "fsync": a.fsync,
              "checkpoint_every_steps": 1, "paper": PAPER,
              "targets": {"overhead_pct": "< 2", "recovery_s": "< 1.5"}, "rows": rows}
    path = write_result(name, result)
    plot(rows, path[:-5] + ".png", f"Concordia, {a.config} on {env['device']}")
    print(table([{**r, "recovery_ms": r["recovery_ms"]["total"]} for r in rows],
                ["batch", "tok_s_plain", "tok_s_ckpt", "overhead_pct", "ckpt_ms_median",
                 "ckpt_ms_p99", "bytes_per_ckpt", "recovery_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

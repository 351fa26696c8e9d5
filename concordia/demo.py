"""`concordia demo`: start an iterative kernel, migrate it mid-run along a path of backends,
and check the final state equals an uninterrupted run bit for bit."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time

import numpy as np

from concordia_ir import Ptr, f32, global_id, i32, kernel, safepoint, u32
from concordia_ir.errors import ConcordiaError

from .backends import Runtime, backend_status
from .handlers.migration import KernelContext, pausable

DEVICE_ORDER = ("cuda", "hip", "hip-on-cuda", "opencl", "tenstorrent")


@kernel
def drift(state: Ptr[f32], seeds: Ptr[u32], energy: Ptr[f32], steps: i32, n: i32):
    """Each work-item walks a noisy decay for `steps` iterations (an LCG drives the noise)."""
    i = global_id(0)
    if i >= n:
        return
    x = state[i]
    h = seeds[i]
    acc = 0.0
    for t in range(steps):
        safepoint()
        h = h * u32(1664525) + u32(1013904223)
        x = x * 0.999 + f32(h >> u32(8)) * 5.9604645e-10
        acc = acc + x * x
    energy[i] = acc
    state[i] = x
    seeds[i] = h


def default_path() -> list[str]:
    """Every device backend available here, in order (the Tenstorrent scalar tier built for
    this host stands in where the simulator is not installed); the reference interpreter
    joins in the middle while there are fewer than three, so that every machine, a CPU-only
    one included, makes at least two hops over three backends."""
    status = backend_status()
    ok = lambda n: n in status and status[n].ok
    path = [n for n in DEVICE_ORDER if ok(n)]
    if not ok("tenstorrent") and ok("tenstorrent-scalar-host"):
        path.append("tenstorrent-scalar-host")
    if len(path) < 3:
        path.insert(1 if path else 0, "reference")
    while len(path) < 3:
        path.append("reference")
    return path


def default_size(path: list[str]) -> tuple[int, int]:
    """Work-items and steps: about a second or more of work on the path's slowest member
    (each backend runs its share: the interpreter and the host-built Tenstorrent tier are
    the slow ones; GPUs alone get far more)."""
    if "reference" in path:
        return 1 << 14, 4000
    gpu = any(p.split(":")[0] in ("cuda", "hip", "hip-on-cuda") for p in path)
    host_tt = any(p.startswith("tenstorrent") for p in path)
    if gpu and host_tt:
        return 1 << 16, 20000
    if not gpu:
        return 1 << 14, 40000
    return 1 << 20, 2_000_000


def _inputs(rt, n: int):
    rng = np.random.default_rng(2026)
    return (rt.to_device(rng.random(n, dtype=np.float32)),
            rt.to_device(rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)),
            rt.zeros(n, np.float32))


def _digest(bufs) -> str:
    h = hashlib.sha256()
    for b in bufs:
        h.update(b.numpy().tobytes())
    return h.hexdigest()


class _Progress:
    def __init__(self, out):
        self.out, self.tty = out, out.isatty()

    def bar(self, label: str, fraction: float):
        width = 30
        full = int(round(fraction * width))
        line = f"  {label:<40} [{'#' * full}{'.' * (width - full)}] {fraction * 100:5.1f}%"
        print(("\r" if self.tty else "") + line, end="" if self.tty else "\n", file=self.out, flush=True)

    def done(self):
        if self.tty:
            print(file=self.out)


def run_demo(path: list[str] | None = None, items: int | None = None, steps: int | None = None,
             json_path: str | None = None, out=sys.stdout) -> dict:
    path = path or default_path()
    if len(path) < 2:
        raise ConcordiaError("a migration path needs at least two backends, e.g. --path opencl,reference")
    d_items, d_steps = default_size(path)
    items, steps = items or d_items, steps or d_steps
    runtimes = [Runtime(p) for p in path]   # every hop's backend must be usable before we start
    local = 64
    g = -(-items // local) * local
    print(f"Concordia demo: {items} work-items x {steps} steps, path "
          f"{' -> '.join(str(r.spec) for r in runtimes)}", file=out)

    # the uninterrupted run, on the first backend (compiled first: we time the kernel)
    rt0 = runtimes[0]
    rt0.backend.prepare(drift.kernel)
    rt0.backend.prepare(pausable(drift.kernel).entry)
    bufs = _inputs(rt0, items)
    t = time.perf_counter()
    rt0.launch(drift, global_size=g, local_size=local, args=(*bufs, steps, items))
    rt0.synchronize()
    base_s = time.perf_counter() - t
    hash_plain = _digest(bufs)
    print(f"  uninterrupted on {rt0.spec}: {base_s:.3f} s, sha256 {hash_plain[:16]}...", file=out)
    for b in bufs:
        rt0.free(b)

    # the migrated run: hop k pauses once k/len(path) of the work is done (by progress, not
    # by time: every hop moves a kernel that is still running), resumes there, ...
    bufs = _inputs(rt0, items)
    progress = _Progress(out)
    # created paused: on a fast GPU the whole kernel can finish before a first pause lands
    ctx = KernelContext(rt0, drift, g, local, (*bufs, steps, items)).start(paused=True)
    with tempfile.TemporaryDirectory(prefix="concordia-demo-") as tmp:
        for k, target in enumerate(runtimes[1:], start=1):
            ctx.advance_to(k / len(path))
            ctx = ctx.migrate(target, via=tmp, resume=False)   # advance_to runs it on
            hop = ctx.history[-1]
            progress.bar(f"{hop.source} -> {hop.target}", hop.progress)
            progress.done()
        ctx.resume().wait()
    progress.bar(f"finished on {ctx.runtime.spec}", ctx.progress())
    progress.done()
    hash_migrated = _digest([ctx.buffers[n] for n in ("state", "seeds", "energy")])
    verified = hash_migrated == hash_plain

    hops = [h.as_json() for h in ctx.history]
    print("\n  hop                       bytes     pause  snapshot  transfer   compile   restore    resume  at", file=out)
    for h in hops:
        print(f"  {h['from'] + ' -> ' + h['to']:<24} {h['bytes']:>6}  " +
              "  ".join(f"{h[k]:8.4f}" for k in ("pause_s", "snapshot_s", "transfer_s",
                                                  "compile_s", "restore_s", "resume_s")) +
              f"  {h['progress_at_pause'] * 100:5.1f}%", file=out)
    print(f"\n  uninterrupted sha256 {hash_plain}\n  migrated      sha256 {hash_migrated}", file=out)
    print("  verified: " + ("yes, bit for bit" if verified else "NO - results differ"), file=out)
    result = {"verified": verified, "hash_uninterrupted": hash_plain, "hash_migrated": hash_migrated,
              "path": [str(r.spec) for r in runtimes], "items": items, "steps": steps,
              "uninterrupted_s": round(base_s, 6), "hops": hops,
              "devices": [r.backend.device_info() for r in runtimes]}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return result

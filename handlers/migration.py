"""KernelContext: a running, pausable kernel, and its migration to another backend.

    ctx = rt.launch(kernel, global_size, local_size, args, pausable=True)
    ctx.pause(); ctx.resume()
    ctx2 = ctx.migrate("reference")          # quiesce, snapshot, re-lower, restore, verify, resume
    ctx.export("run.ccsnap"); ctx3 = Runtime("opencl").import_("run.ccsnap")

Snapshot format (self-describing, versioned, checksummed):
    magic b"CCSNAP\\r\\n" | u16 version | u16 0 | u32 header length | header (JSON) |
    blobs (regions' bytes, then the context buffer) | u32 CRC32C of everything before it.
The header holds the IR text, launch geometry, scalar arguments (as bits), each region's
dtype/size/SHA-256 and the context layout. Pointers travel as regions, never as addresses.
"""
from __future__ import annotations

import json
import os
import struct
import time
from dataclasses import dataclass

import crc32c
import numpy as np

from concordia_ir.errors import ConcordiaError, SnapshotError
from concordia_ir.ops import Kernel, Module
from concordia_ir.parser import parse_module
from concordia_ir.printer import print_module
from concordia.backends.runtime import DeviceBuffer, Runtime, _as_kernel, register_kernel_contexts
from concordia_ir.types import PtrType, SCALARS

from . import kernels as hk
from .checkpointer import apply_image, device_digest
from .durable import replace_atomically
from .regions import PageStager, Region
from concordia_ir.passes.safepoints import DONE, PAUSED, POLL_EVERY_DEFAULT, PausableKernel, make_pausable

SNAP_MAGIC = b"CCSNAP\r\n"
SNAP_VERSION = 1
PAGE = 4096
SNAPSHOT_STAGING = 64 << 20   # bytes gathered per round trip when snapshotting a region
_PAUSABLE: dict[tuple[int, int], tuple[Kernel, PausableKernel]] = {}


def pausable(kernel: Kernel, poll_every: int = POLL_EVERY_DEFAULT) -> PausableKernel:
    key = (id(kernel), poll_every)
    hit = _PAUSABLE.get(key)
    if hit is None or hit[0] is not kernel:
        hit = (kernel, make_pausable(kernel, poll_every))
        _PAUSABLE[key] = hit
    return hit[1]


@dataclass
class Hop:
    """One migration's timeline, in seconds, and the bytes it moved."""
    source: str
    target: str
    bytes: int = 0
    pause_s: float = 0.0
    snapshot_s: float = 0.0
    transfer_s: float = 0.0
    compile_s: float = 0.0
    restore_s: float = 0.0
    resume_s: float = 0.0
    progress: float = 0.0
    verified: bool = False

    def as_json(self) -> dict:
        return {"from": self.source, "to": self.target, "bytes": self.bytes,
                "pause_s": round(self.pause_s, 6), "snapshot_s": round(self.snapshot_s, 6),
                "transfer_s": round(self.transfer_s, 6), "compile_s": round(self.compile_s, 6),
                "restore_s": round(self.restore_s, 6), "resume_s": round(self.resume_s, 6),
                "progress_at_pause": round(self.progress, 4), "verified": self.verified}


class KernelContext:
    """Everything needed to continue a kernel elsewhere: IR, geometry, arguments, the regions
    it touches (its pointer arguments) and the context buffer of its paused work-items."""

    def __init__(self, runtime, kernel, global_size, local_size, args,
                 poll_every: int = POLL_EVERY_DEFAULT):
        self.runtime = runtime
        self.kernel: Kernel = _as_kernel(kernel)
        self.pk = pausable(self.kernel, poll_every)
        k, self.global_size, self.local_size, _ = runtime.check_launch(
            self.kernel, global_size, local_size, args)
        self.args = tuple(args)
        g, l = self.global_size, self.local_size
        self.n_items = g[0] * g[1] * g[2]
        self.n_groups = (g[0] // l[0]) * (g[1] // l[1]) * (g[2] // l[2])
        self.ctx_buf = runtime.zeros(self.pk.context_words(self.n_items, self.n_groups), np.uint32)
        self.pause_buf = DeviceBuffer(runtime, runtime.backend.alloc_control(4), np.int32, 1)
        self.pause_buf.write(np.zeros(1, np.int32))
        self.state = "new"
        self.history: list[Hop] = []
        self.last_pause_s = 0.0   # how long the last pause() took to quiesce

    # -- the regions: pointer arguments, by parameter name
    @property
    def buffers(self) -> dict[str, DeviceBuffer]:
        return {p.name: a for p, a in zip(self.kernel.params, self.args)
                if isinstance(p.type, PtrType)}

    def _handles(self):
        _, _, _, handles = self.runtime.check_launch(self.kernel, self.global_size,
                                                     self.local_size, self.args)
        return handles + [self.pause_buf.handle, self.ctx_buf.handle]

    # -- lifecycle
    def start(self, paused: bool = False) -> "KernelContext":
        """Launch the entry kernel; with paused=True every work-item stops at its first safepoint."""
        if paused:
            self.runtime.backend.write_control(self.pause_buf.handle, np.ones(1, np.int32))
        self.runtime.backend.launch_async(self.pk.entry, self._handles(), self.global_size,
                                          self.local_size)
        self.state = "running"
        return self

    def pause(self) -> "KernelContext":
        """Ask every work-item to stop at its next safepoint, and wait until all have."""
        if self.state != "running":
            return self
        t = time.perf_counter()
        self.runtime.backend.write_control(self.pause_buf.handle, np.ones(1, np.int32))
        self.runtime.synchronize()
        self._settle()
        self.last_pause_s = time.perf_counter() - t
        return self

    def wait(self) -> "KernelContext":
        """Wait for the kernel to stop (finished, or paused if a pause was requested)."""
        self.runtime.synchronize()
        self._settle()
        return self

    def counts(self) -> np.ndarray:
        """[running, done, paused, paused at safepoint 0, 1, ...], counted on the device."""
        slots = 3 + max(self.pk.resumes) + 1
        if slots > 64:
            raise ConcordiaError("more than 61 safepoints in one kernel")
        out = self.runtime.zeros(slots, np.int32)
        self.runtime.launch(hk.state_counter(self.pk.record_words, slots),
                            global_size=-(-self.n_items // 256) * 256, local_size=256,
                            args=(self.ctx_buf, out, self.n_items))
        counts = out.numpy()
        self.runtime.free(out)
        return counts

    def _settle(self):
        self.state = "paused" if self.counts()[PAUSED] > 0 else "finished"

    def step(self) -> "KernelContext":
        """Run every paused work-item to its next safepoint (one loop iteration) and pause."""
        self._resume(keep_paused=True)
        return self.wait()

    def resume(self) -> "KernelContext":
        return self._resume(keep_paused=False)

    def _resume(self, keep_paused: bool) -> "KernelContext":
        if self.state == "running":
            raise ConcordiaError("the kernel is running; pause() it first")
        if self.state in ("finished", "released"):
            return self
        self.runtime.backend.write_control(self.pause_buf.handle,
                                           np.full(1, int(keep_paused), np.int32))
        counts = self.counts()
        for sp in [sp for sp in sorted(self.pk.resumes) if counts[3 + sp] > 0]:
            self.runtime.backend.launch_async(self.pk.resumes[sp], self._handles(),
                                              self.global_size, self.local_size)
        self.state = "running"
        return self

    def advance_to(self, fraction: float, step_budget_s: float = 1.0,
                   probe_s: float = 1e-4) -> float:
        """Let the kernel run until at least `fraction` of its loop iterations are done, then
        leave it paused; returns the progress reached. It moves by step() (one poll interval
        at a time: it cannot run past the next poll) while the rate seen says stepping gets
        there within `step_budget_s`. Only a longer way is run free: a short probe first,
        then half the time the fastest rate seen says is left. A step's rate includes its
        launches and reads, so it understates a free run's many times over on a fast GPU
        (there, a whole kernel can take less than a millisecond): a free run never goes
        longer than that rate allows."""
        for k in self.pk.kernels:
            self.runtime.backend.prepare(k)   # compile first: a step must not time the compiler
        if self.state == "new":
            self.start(paused=True)
        self.pause()
        done, fastest, probed = self.progress(), 0.0, False
        while done < fraction and self.state != "finished":
            left_s = (fraction - done) / fastest if fastest > 0 else 0.0
            t = time.perf_counter()
            if left_s < step_budget_s:
                self.step()
            else:
                self.resume()
                time.sleep(left_s / 2 if probed else probe_s)
                self.pause()
                probed = True
            now = self.progress()
            fastest = max(fastest, (now - done) / (time.perf_counter() - t))
            done = now
        return done

    def records(self) -> np.ndarray:
        """(n_items, record_words) view of the work-items' records."""
        return self.ctx_buf.read(self.n_items * self.pk.record_words).reshape(
            self.n_items, self.pk.record_words)

    def statuses(self) -> np.ndarray:
        return self.records()[:, 0]

    def progress(self) -> float:
        """Fraction of the loop iterations done, over all work-items (finished ones count 1)."""
        rec = self.records()
        done = (rec[:, 0] == DONE).sum()
        paused = rec[:, 0] == PAUSED
        if not paused.any():
            return float(done / self.n_items) if self.state != "new" else 0.0
        frac = _loop_fraction(self, rec[paused])
        return float((done + frac.sum()) / self.n_items)

    # -- snapshots
    def snapshot(self) -> bytes:
        """Self-describing bytes of a paused (or finished) context. Regions are read with the
        page gatherer, the same handler a checkpoint uses."""
        if self.state == "running":
            raise ConcordiaError("snapshot() needs a paused context: call pause() first")
        self.runtime.synchronize()
        header = {"format": "concordia-snapshot", "version": SNAP_VERSION,
                  "created": time.time(), "source": str(self.runtime.spec),
                  "ir": print_module(Module((self.kernel,))), "kernel": self.kernel.name,
                  "global_size": list(self.global_size), "local_size": list(self.local_size),
                  "state": self.state, "layout": self.pk.describe(), "args": []}
        blobs, offset = [], 0
        for p, a in zip(self.kernel.params, self.args):
            if isinstance(p.type, PtrType):
                data = read_region(self.runtime, a)
                header["args"].append({"param": p.name, "kind": "region", "dtype": a.dtype.str,
                                       "size": a.size, "offset": offset, "nbytes": len(data),
                                       "digest": device_digest(self.runtime, a)})
            else:
                v = np.asarray(a if isinstance(a, np.generic) else p.type.dtype.type(a),
                               dtype=p.type.dtype)
                header["args"].append({"param": p.name, "kind": "scalar", "type": p.type.name,
                                       "bits": v.tobytes().hex()})
                continue
            blobs.append(data)
            offset += len(data)
        ctx = memoryview(self.ctx_buf.numpy()).cast("B")
        header["context"] = {"offset": offset, "nbytes": len(ctx),
                             "digest": device_digest(self.runtime, self.ctx_buf)}
        blobs.append(ctx)
        head = json.dumps(header, sort_keys=True).encode()
        parts = [SNAP_MAGIC + struct.pack("<HHI", SNAP_VERSION, 0, len(head)) + head, *blobs]
        crc = 0
        for part in parts:     # the checksum chains over the parts: no copy is made for it
            crc = crc32c.crc32c(part, crc)
        return b"".join(parts + [struct.pack("<I", crc)])

    def export(self, path: str) -> int:
        """Write the snapshot to a file atomically (temp file, fsync, rename, fsync of the
        directory): a crash leaves the previous snapshot or this one. Returns its size."""
        return replace_atomically(path, self.snapshot())

    # -- migration
    def migrate(self, target, via: str | None = None, resume: bool = True) -> "KernelContext":
        """Quiesce here, move everything to `target` (a backend string or Runtime), verify it
        there by content hash, release this context, and resume there. If anything fails
        before the verification, this context is left paused and resumable."""
        hop = Hop(str(self.runtime.spec), "")
        self.pause()
        hop.pause_s = self.last_pause_s
        hop.progress = self.progress()
        t = time.perf_counter()
        snap = self.snapshot()
        hop.snapshot_s = time.perf_counter() - t
        hop.bytes = len(snap)
        t = time.perf_counter()
        if via:   # through a file, as between processes or machines
            path = os.path.join(via, f"{self.kernel.name}-{len(self.history)}.ccsnap")
            with open(path, "wb") as fh:
                fh.write(snap)
            with open(path, "rb") as fh:
                snap = fh.read()
            os.remove(path)
        hop.transfer_s = time.perf_counter() - t
        rt = target if isinstance(target, Runtime) else Runtime(target)
        hop.target = str(rt.spec)
        new = restore_snapshot(snap, rt, hop)
        hop.verified = True
        t = time.perf_counter()
        if resume:      # else the caller resumes it (advance_to, step, resume)
            new.resume()
        hop.resume_s = time.perf_counter() - t
        new.history = self.history + [hop]
        self.release()
        return new

    def release(self) -> None:
        """Free this context's own buffers (the caller's regions stay theirs)."""
        for b in (self.ctx_buf, self.pause_buf):
            self.runtime.free(b)
        self.state = "released"


def _loop_fraction(ctx: KernelContext, rec: np.ndarray) -> np.ndarray:
    """For paused work-items of a counted loop: (iv - start) / trip count, else 0.5."""
    out = np.full(len(rec), 0.5)
    for sp, slots in ctx.pk.slots.items():
        loop = next((op for op in ctx.kernel.body.ops if op.name == "for"
                     and op.regions[0].ops and op.regions[0].ops[0].attr("id") == sp), None)
        if loop is None:
            continue
        hi = _scalar_value(ctx, loop.operands[1])
        if hi is None or hi <= 0:
            continue
        sel = rec[:, 1] == sp
        iv = rec[sel, slots[0].word].view(np.int32) if slots[0].type.bits == 32 else rec[sel, slots[0].word]
        out[sel] = np.clip(iv / hi, 0, 1)
    return out


def _scalar_value(ctx: KernelContext, v):
    for p, a in zip(ctx.kernel.params, ctx.args):
        if p.name == v.name and not isinstance(p.type, PtrType):
            return float(a)
    return None


def read_region(runtime, buf: DeviceBuffer) -> memoryview:
    """A buffer's bytes through the page gatherer (whole pages, the tail trimmed)."""
    if buf.nbytes % 4:
        return memoryview(buf.numpy()).cast("B")
    region = Region(0, "r", buf, PAGE)
    stager = PageStager(runtime, region, SNAPSHOT_STAGING)
    out = np.empty(region.n_pages * PAGE, np.uint8)
    try:
        for part, raw in stager.batches(np.arange(region.n_pages, dtype=np.int32)):
            out[int(part[0]) * PAGE:int(part[0]) * PAGE + raw.size] = raw
    finally:
        stager.free()
    return memoryview(out[:buf.nbytes])


def parse_snapshot(data: bytes) -> tuple[dict, bytes]:
    if data[:len(SNAP_MAGIC)] != SNAP_MAGIC:
        raise SnapshotError("not a Concordia snapshot (bad magic)")
    if len(data) < len(SNAP_MAGIC) + 12:
        raise SnapshotError("snapshot is truncated")
    version, _, hlen = struct.unpack_from("<HHI", data, len(SNAP_MAGIC))
    if version > SNAP_VERSION:
        raise SnapshotError(f"snapshot format v{version} is newer than this Concordia (v{SNAP_VERSION})")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    data = memoryview(data)
    if crc != crc32c.crc32c(data[:-4]):
        raise SnapshotError("snapshot checksum mismatch (corrupt or truncated)")
    start = len(SNAP_MAGIC) + 8
    header = json.loads(bytes(data[start:start + hlen]))
    return header, data[start + hlen:-4]


def restore_snapshot(data: bytes, runtime, hop: Hop | None = None) -> KernelContext:
    """A paused KernelContext on `runtime` from snapshot bytes, verified by content hash."""
    hop = hop or Hop("", str(runtime.spec))
    header, blobs = parse_snapshot(data)
    t = time.perf_counter()
    kernel = parse_module(header["ir"], "<snapshot>").kernel(header["kernel"])
    pk = pausable(kernel, header["layout"]["poll_every"])
    if json.loads(json.dumps(pk.describe())) != header["layout"]:
        raise SnapshotError("the snapshot's context layout does not match its kernel's")
    for k in pk.kernels:
        runtime.backend.prepare(k)
    hop.compile_s = time.perf_counter() - t
    t = time.perf_counter()
    args = []
    for a in header["args"]:
        if a["kind"] == "scalar":
            t_ = SCALARS[a["type"]]
            args.append(np.frombuffer(bytes.fromhex(a["bits"]), dtype=t_.dtype)[0])
            continue
        raw = blobs[a["offset"]:a["offset"] + a["nbytes"]]
        buf = runtime.empty(a["size"], np.dtype(a["dtype"]))
        if len(raw) % 4 == 0 and raw:
            apply_image(runtime, Region(0, a["param"], buf, PAGE), raw)
        elif raw:
            buf.write(np.frombuffer(raw, dtype=buf.dtype))
        if device_digest(runtime, buf) != a["digest"]:
            raise SnapshotError(f"region {a['param']!r} restored on {runtime.spec} does not match "
                                "its hash in the snapshot")
        args.append(buf)
    ctx = KernelContext(runtime, kernel, tuple(header["global_size"]), tuple(header["local_size"]),
                        tuple(args), pk.poll_every)
    c = header["context"]
    raw = blobs[c["offset"]:c["offset"] + c["nbytes"]]
    ctx.ctx_buf.write(np.frombuffer(raw, dtype=np.uint32))
    if device_digest(runtime, ctx.ctx_buf) != c["digest"]:
        raise SnapshotError("context buffer restored does not match its hash in the snapshot")
    ctx.state = header["state"]
    hop.restore_s = time.perf_counter() - t
    return ctx


def import_snapshot(path: str, runtime) -> KernelContext:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return restore_snapshot(data, runtime)
    except SnapshotError as e:
        raise SnapshotError(f"{path}: {e}") from None


register_kernel_contexts(KernelContext, import_snapshot)

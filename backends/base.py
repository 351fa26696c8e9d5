"""The one small interface every runtime implements, and the registry that names them."""
from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from concordia_ir.errors import ConcordiaError

from .dlpack import KDL_CPU, KDL_CUDA_HOST, device_text, read_dlpack


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; `reason` says why not and how to fix it."""
    ok: bool
    reason: str = ""
    devices: tuple[str, ...] = ()
    versions: dict = field(default_factory=dict)
    gpu: bool = False  # the best device is a GPU (used to rank backends)


class Backend(ABC):
    """A device runtime. Buffers are opaque handles of raw bytes; kernels are IR."""

    name: str = ""

    @classmethod
    @abstractmethod
    def probe(cls) -> Availability:
        """Check, without side effects, whether this backend can run here."""

    def __init__(self, device: str | None = None):
        self.device = device

    @abstractmethod
    def alloc(self, nbytes: int): ...

    def free(self, handle) -> None:
        pass

    @abstractmethod
    def copy_in(self, handle, host: np.ndarray) -> None:
        """Copy a contiguous host array into a buffer (same byte size or smaller)."""

    @abstractmethod
    def copy_out(self, handle, host: np.ndarray) -> None:
        """Copy a buffer's bytes into a contiguous host array."""

    @abstractmethod
    def launch(self, kernel, args: list, global_size: tuple, local_size: tuple) -> None:
        """Run an IR kernel; `args` holds buffer handles and numpy scalars, in order."""

    def launch_async(self, kernel, args: list, global_size: tuple, local_size: tuple) -> None:
        """Start a kernel and return at once (device backends are asynchronous already)."""
        self.launch(kernel, args, global_size, local_size)

    def alloc_control(self, nbytes: int):
        """Memory for a flag that the host writes while kernels run (see write_control)."""
        return self.alloc(nbytes)

    def write_control(self, handle, host: np.ndarray) -> None:
        """Write a few bytes that a running kernel polls (a pause flag) without waiting for it."""
        self.copy_in(handle, host)

    def prepare(self, kernel) -> None:
        """Compile a kernel ahead of its launch (no-op for interpreters)."""

    def prebuild(self, kernel) -> None:
        """Compile a kernel to its binary without loading it: safe while a persistent kernel
        runs (loading a module may wait for the running kernels)."""
        self.prepare(kernel)

    def copy_out_many(self, pairs) -> None:
        """copy_out of several (handle, host) pairs, the device synchronised before (a backend
        with a bounce buffer waits once for as many as it holds)."""
        self.synchronize()
        for handle, host in pairs:
            self.copy_out(handle, host)

    def address(self, handle) -> int | None:
        """Where a buffer's memory is (None: not known): memory made for one buffer is
        recognised at the next that wraps the same address (a staging ring's slots)."""
        return None

    def copy_device(self, dst, src, nbytes: int) -> None:
        """Device-to-device copy of nbytes (used by benchmarks and migration)."""
        host = np.empty(nbytes, np.uint8)
        self.copy_out(src, host)
        self.copy_in(dst, host)

    def copy_device_on(self, stream, dst, src, nbytes: int) -> None:
        """copy_device, enqueued on `stream`."""
        self.copy_device(dst, src, nbytes)

    def synchronize(self) -> None:
        pass

    # -- stream-ordered work (asynchronous checkpoints). A backend without streams does each
    # call at once, in the caller's order: its "stream" is None and its events are complete.
    streams = False

    def bind(self, kernel, args: list, local_size: tuple):
        """A launch with its arguments fixed: bound(groups, stream=None)."""
        def bound(groups: int, stream=None):
            global_size = (groups * local_size[0], local_size[1], local_size[2])
            self.launch_on(stream, kernel, args, global_size, local_size)
        return bound

    graphs = False   # capture / launch_graph exist

    def capture(self, *records, first=None):
        """What each `record(stream)` enqueues, as one replayable graph whose records run as
        parallel branches, joined at its end, after `first(stream)` if given (backends with
        graphs)."""
        raise NotImplementedError(f"backend {self.name!r} has no graphs")

    def launch_graph(self, graph, stream) -> None:
        raise NotImplementedError(f"backend {self.name!r} has no graphs")

    def memset32_on(self, stream, handle, value: int, count: int) -> None:
        self.copy_in_on(stream, handle, np.full(count, value, np.uint32))

    def new_stream(self):
        """A stream of this backend's own that does not wait for other streams' work."""
        return None

    def side_stream(self):
        """The backend's one stream for work forked off a caller's stream (made on first
        use, kept for the backend's life)."""
        return None

    def stream_wait(self, stream, event) -> None:
        """Work enqueued on `stream` after this call waits for `event` (None: complete)."""

    def launch_on(self, stream, kernel, args: list, global_size: tuple, local_size: tuple) -> None:
        """launch, enqueued on `stream` (returns before the kernel runs where streams exist)."""
        self.launch(kernel, args, global_size, local_size)

    def copy_in_on(self, stream, handle, host: np.ndarray) -> None:
        """Enqueue host -> device; `host` must stay unchanged until the stream has passed it
        (pinned memory where streams exist)."""
        self.copy_in(handle, host)

    def copy_out_on(self, stream, handle, host: np.ndarray) -> None:
        """Enqueue device -> host into `host` (pinned where streams exist)."""
        self.copy_out(handle, host)

    def record_event(self, stream, event=None):
        """A marker of everything enqueued on `stream` so far (None: already complete);
        `event`, one this returned before and now complete, is recorded again."""
        return None

    def event_done(self, event) -> bool:
        return True

    def wait_event(self, event) -> None:
        """Block until `event` has passed, asleep and without the GIL. (A thread that polls
        instead takes the GIL at each wake-up from a caller's thread that gives it up at every
        torch op, and keeps a core awake; on an H100 the change moved no throughput that
        could be told apart from noise.)"""

    def pinned(self, nbytes: int) -> np.ndarray:
        """Host memory the device copies to and from asynchronously (page-locked)."""
        return np.empty(max(nbytes, 1), np.uint8)

    def free_pinned(self, host: np.ndarray) -> None:
        """Give back what pinned() returned (page-locked memory is not garbage-collected)."""

    def destroy_graph(self, graph) -> None:
        """Give back a graph that capture() returned."""

    def destroy_event(self, event) -> None:
        """Give back an event that record_event() made."""

    parts = False   # offset() exists: a buffer's part is a buffer (DeviceBuffer.part)

    def offset(self, handle, nbytes: int):
        """The handle of the memory `nbytes` into `handle`'s (DeviceBuffer.part)."""
        raise ConcordiaError(f"backend {self.name!r} cannot address part of a buffer")

    def page_ops(self, page_size: int):
        """A native form of the checkpoint page handlers (scan / gather / scatter) for regions
        paged this way, or None: the Checkpointer then runs the IR handlers."""
        return None

    # -- for persistent kernels (handlers/persistent.py)
    def resident_groups(self) -> int | None:
        """How many work-groups are sure to make progress side by side (a persistent kernel
        spins in each); None when the backend cannot say."""
        return None
    def alloc_mapped(self, nbytes: int):
        """(handle, host view): memory that the host and a running kernel both access directly,
        without copies (a task ring). Raises where the device offers no coherent mapping."""
        raise ConcordiaError(f"backend {self.name!r} has no host-mapped memory for a task ring")

    def free_mapped(self, handle) -> None:
        self.free(handle)

    def launch_detached(self, kernel, args: list, global_size: tuple, local_size: tuple):
        """Start a kernel that runs beside later work (a persistent kernel); returns an object
        with done() -> bool (raises the kernel's error) and wait()."""
        self.launch_async(kernel, args, global_size, local_size)
        return ThreadedRun(self)

    def wrap_dlpack(self, tensor):
        """(handle, dtype, size, keepalive) for a DLPack tensor on this backend's device."""
        raise ConcordiaError(f"backend {self.name!r} cannot wrap external memory (DLPack)")

    def device_info(self) -> dict:
        return {"backend": self.name, "device": self.device}


class ThreadedRun:
    """A detached launch of a backend that runs kernels in a host thread (launch_async)."""

    def __init__(self, backend):
        self.backend, self.thread = backend, getattr(backend, "_thread", None)

    def done(self) -> bool:
        if self.thread is not None and self.thread.is_alive():
            return False
        self.backend.synchronize()   # re-raises the kernel's error
        return True

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done()


BACKENDS: dict[str, type[Backend]] = {}


def register_backend(name: str):
    def deco(cls):
        cls.name = name
        BACKENDS[name] = cls
        return cls
    return deco


def wrap_host_dlpack(backend: str, tensor):
    """wrap_dlpack for backends whose device memory is host memory (numpy byte arrays): any
    contiguous CPU tensor, of any dtype, is seen in place as its bytes."""
    view = read_dlpack(tensor)
    if view.device_type not in (KDL_CPU, KDL_CUDA_HOST):
        raise ConcordiaError(f"the {backend} backend wraps tensors in host memory; this one is on "
                             f"{device_text(view)} (wrap it on a backend of that device)")
    nbytes = view.size * view.dtype.itemsize
    raw = (np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(view.pointer))
           if nbytes else np.zeros(0, np.uint8))
    return raw, view.dtype, view.size, (tensor, view.capsule)


def backend_status() -> dict[str, Availability]:
    """Every registered backend and whether it can run here."""
    out = {}
    for name, cls in BACKENDS.items():
        try:
            out[name] = cls.probe()
        except Exception as e:  # a broken vendor install must not break the listing
            out[name] = Availability(False, f"probe failed: {type(e).__name__}: {e}")
    return out

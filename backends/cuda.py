"""`cuda` via cuda-python (cuda.bindings): NVRTC to a cubin, the driver API to load and launch.

`hip-on-cuda` is the same runtime running the *HIP* lowering through lowering/include/
hip_on_cuda.h: it checks the HIP text's semantics on NVIDIA hardware until AMD hardware exists.
"""
from __future__ import annotations

import ctypes
import gc
import threading

import os

import numpy as np

from concordia_ir.errors import BackendUnavailable, ConcordiaError
from concordia.lowering import INCLUDE_DIR, render_source
from concordia.lowering.compile import CUDA_OPTIONS, compile_cuda, nvrtc_version

from .base import Availability, Backend, register_backend
from concordia.lowering.target import Options, Target

from .compiled import CompiledKernels


_DRIVER: list = []   # the bindings' driver module, imported on first use (the import
# statement itself cost ~1.5 us a call, 4,000 calls in a Hugging Face guard's setup)


def _driver():
    if not _DRIVER:
        from cuda.bindings import driver
        _DRIVER.append(driver)
    return _DRIVER[0]


# loaded kernels by (backend name, device ordinal): every backend on a device shares its
# primary context, so a module loaded once serves each Runtime("cuda") made after it (a
# Hugging Face guard, one Runtime a generate call, loaded its ten kernels again each time)
_KERNELS: dict[tuple, CompiledKernels] = {}


def _check(result, what: str):
    driver = _driver()
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        _, msg = driver.cuGetErrorString(err)
        raise ConcordiaError(f"CUDA {what} failed: {err.name}: "
                             f"{msg.decode() if isinstance(msg, bytes) else msg}")
    return result[1] if len(result) == 2 else result[1:]


@register_backend("cuda")
class CUDABackend(Backend):
    target = "cuda"

    @classmethod
    def probe(cls) -> Availability:
        try:
            driver = _driver()
        except ImportError:
            return Availability(False, "cuda-bindings is not installed: pip install cuda-bindings "
                                       "nvidia-cuda-nvrtc")
        try:
            err, = driver.cuInit(0)
        except Exception as e:  # the bindings raise when libcuda.so itself is missing
            return Availability(False, f"no NVIDIA driver here ({type(e).__name__}); CUDA code can "
                                       "still be compiled: concordia compile --target cuda")
        if err != driver.CUresult.CUDA_SUCCESS:
            return Availability(False, f"cuInit failed: {err.name} (no usable NVIDIA GPU)")
        _, count = driver.cuDeviceGetCount()
        if count == 0:
            return Availability(False, "the NVIDIA driver found no GPU")
        names = []
        for i in range(count):
            _, dev = driver.cuDeviceGet(i)
            names.append(f"{i}: {_device_name(dev)} ({_arch(dev)})")
        _, drv = driver.cuDriverGetVersion()
        versions = {"driver": f"{drv // 1000}.{drv % 1000 // 10}"}
        try:
            versions["nvrtc"] = nvrtc_version()
        except Exception as e:
            return Availability(False, f"NVRTC is not usable ({e}): pip install nvidia-cuda-nvrtc")
        return Availability(True, devices=tuple(names), versions=versions, gpu=True)

    def __init__(self, device: str | None = None):
        super().__init__(device)
        self._pins = threading.local()    # a pinned bounce buffer a thread, made on first use
        self._mapped: dict[int, object] = {}   # device pointer -> host allocation (alloc_mapped)
        self.control_stream = None        # non-blocking streams, made on first use
        self._side_stream = None
        self.detached_stream = None
        self.detached: list = []   # detached launches not yet seen finished
        self._branch_streams: list = []   # capture's branches beyond the first, made on demand
        # one capture at a time: captures share the branch streams (two threads' guards on one
        # Runtime would otherwise fork into the same stream, joining each other's graph)
        self._capturing = threading.Lock()
        self._control_pin = None
        self._pinned_blocks: dict = {}   # address -> page-locked host memory handed out by pinned()
        driver = _driver()
        try:
            ordinal = int(device or 0)
        except ValueError:
            raise BackendUnavailable(f"CUDA device must be a number, got {device!r}") from None
        _check(driver.cuInit(0), "cuInit")
        count = _check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
        if not 0 <= ordinal < count:
            raise BackendUnavailable(f"CUDA device {ordinal} does not exist; there are {count}")
        self.dev = _check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
        self.ctx = _check(driver.cuDevicePrimaryCtxRetain(self.dev), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.arch = _arch(self.dev)
        key = (self.name, ordinal)
        if key not in _KERNELS:
            _KERNELS[key] = CompiledKernels(Target(self.name, self.arch),
                                            Options(CUDA_OPTIONS, f"nvrtc {nvrtc_version()}"),
                                            "cubin", render=type(self).render)
        self.kernels = _KERNELS[key]

    @classmethod
    def render(cls, kernel) -> str:
        return render_source(kernel, cls.target)

    def device_info(self) -> dict:
        return {"backend": self.name, "device": _device_name(self.dev), "arch": self.arch}

    def activate(self):
        _check(_driver().cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int):
        self.activate()
        return _check(_driver().cuMemAlloc(nbytes), f"cuMemAlloc({nbytes})")

    def free(self, handle):
        self.activate()
        _check(_driver().cuMemFree(handle), "cuMemFree")

    PINNED_BYTES = 4 << 20

    def _pinned(self) -> np.ndarray:
        """A page-locked bounce buffer: small copies through it take microseconds, where a
        pageable copy costs tens (what a one-page checkpoint is made of)."""
        pin = getattr(self._pins, "buffer", None)   # one a thread: a copy in flight from
        if pin is None:                             # one thread's must not be overwritten
            pin = self._pins.buffer = self.pinned(self.PINNED_BYTES)   # by another's
        return pin

    def copy_in_async(self, handle, host) -> None:
        """Stage `host` in the pinned buffer and enqueue the copy (complete before reusing it)."""
        host = np.ascontiguousarray(host)
        self.activate()
        pin = self._pinned()
        pin[:host.nbytes] = host.reshape(-1).view(np.uint8)
        _check(_driver().cuMemcpyHtoDAsync(handle, pin.ctypes.data, host.nbytes, 0), "cuMemcpyHtoDAsync")

    def copy_out_async(self, handle, host):
        """Enqueue a copy into the pinned buffer; the returned callable, run after the stream
        is synchronised, moves the bytes into `host`."""
        self.activate()
        pin = self._pinned()
        _check(_driver().cuMemcpyDtoHAsync(pin.ctypes.data, handle, host.nbytes, 0), "cuMemcpyDtoHAsync")

        def finish():
            host.reshape(-1).view(np.uint8)[:] = pin[:host.nbytes]
        return finish

    def copy_in(self, handle, host):
        host = np.ascontiguousarray(host)
        if host.nbytes <= self.PINNED_BYTES:
            self.copy_in_async(handle, host)
            self.synchronize()
        else:
            self.activate()
            _check(_driver().cuMemcpyHtoD(handle, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")

    def copy_out(self, handle, host):
        if host.nbytes <= self.PINNED_BYTES:
            finish = self.copy_out_async(handle, host)
            self.synchronize()
            finish()
        else:
            self.activate()
            _check(_driver().cuMemcpyDtoH(host.ctypes.data, handle, host.nbytes), "cuMemcpyDtoH")

    def copy_out_many(self, pairs):
        """Into the bounce buffer as many copies as it holds, then one wait: a base image of
        the guard's 58 regions waited twice a region (~5 ms of its first call on an H100)."""
        self.synchronize()
        pin, driver, queued, used = self._pinned(), _driver(), [], 0

        def drain():
            self.synchronize()
            for at, host in queued:
                host.reshape(-1).view(np.uint8)[:] = pin[at:at + host.nbytes]
            queued.clear()
        for handle, host in pairs:
            if host.nbytes > self.PINNED_BYTES:
                self.copy_out(handle, host)
                continue
            if used + host.nbytes > self.PINNED_BYTES:
                drain()
                used = 0
            self.activate()
            _check(driver.cuMemcpyDtoHAsync(pin.ctypes.data + used, handle, host.nbytes, 0),
                   "cuMemcpyDtoHAsync")
            queued.append((used, host))
            used += -(-host.nbytes // 256) * 256
        if queued:
            drain()

    def write_control(self, handle, host):
        """Through a non-blocking stream: the legacy stream would wait for the running kernel."""
        driver = _driver()
        self.activate()
        if self.control_stream is None:
            self.control_stream = self.new_stream()
            self._control_pin = _check(driver.cuMemHostAlloc(64, 0), "cuMemHostAlloc")
        host = np.ascontiguousarray(host)
        ctypes.memmove(int(self._control_pin), host.ctypes.data, host.nbytes)
        _check(driver.cuMemcpyHtoDAsync(handle, self._control_pin, host.nbytes, self.control_stream),
               "cuMemcpyHtoDAsync (control)")
        _check(driver.cuStreamSynchronize(self.control_stream), "cuStreamSynchronize (control)")

    def alloc_mapped(self, nbytes):
        """Pinned host memory mapped into the device's address space (zero-copy): the host
        writes task records, the kernel reads them over PCIe; the kernel writes completions."""
        driver = _driver()
        self.activate()
        flags = driver.CU_MEMHOSTALLOC_DEVICEMAP | driver.CU_MEMHOSTALLOC_PORTABLE
        host = _check(driver.cuMemHostAlloc(nbytes, flags), "cuMemHostAlloc(DEVICEMAP)")
        dptr = _check(driver.cuMemHostGetDevicePointer(host, 0), "cuMemHostGetDevicePointer")
        view = _host_view(host, nbytes)
        view[:] = 0
        self._mapped[int(dptr)] = host
        return dptr, view

    parts = True

    def offset(self, handle, nbytes):
        return _driver().CUdeviceptr(int(handle) + nbytes)

    def address(self, handle):
        return int(handle)

    def free_mapped(self, handle):
        host = self._mapped.pop(int(handle), None)
        if host is not None:
            self.activate()
            _check(_driver().cuMemFreeHost(host), "cuMemFreeHost")

    def resident_groups(self):
        driver = _driver()
        attr = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        return int(_check(driver.cuDeviceGetAttribute(attr, self.dev), "cuDeviceGetAttribute"))

    def launch_detached(self, kernel, args, global_size, local_size):
        """On a stream of its own that does not synchronise with the legacy stream, so that
        copies and other kernels run beside the persistent kernel."""
        driver = _driver()
        if self.detached_stream is None:
            self.detached_stream = self.new_stream()
        params = self.launch_on(self.detached_stream, kernel, args, global_size, local_size)
        event = self.record_event(self.detached_stream)
        backend = self

        class Run:
            keep = params

            def done(self) -> bool:
                backend.activate()
                err = driver.cuEventQuery(event)[0]
                if err == driver.CUresult.CUDA_ERROR_NOT_READY:
                    return False
                _check((err,), f"persistent kernel {kernel.name}")
                return True

            def wait(self, timeout=None) -> bool:
                import time
                end = None if timeout is None else time.monotonic() + timeout
                while not self.done():
                    if end is not None and time.monotonic() > end:
                        return False
                    time.sleep(50e-6)
                return True
        run = Run()
        self.detached.append(run)
        return run

    def prepare(self, kernel):
        self.compile(kernel)

    def prebuild(self, kernel):
        self.kernels.build(kernel, lambda src: compile_cuda(src, self.arch))

    def copy_device(self, dst, src, nbytes):
        self.activate()
        _check(_driver().cuMemcpyDtoD(dst, src, nbytes), "cuMemcpyDtoD")

    def wrap_dlpack(self, tensor):
        from .dlpack import KDL_CUDA, device_text, read_dlpack
        view = read_dlpack(tensor)
        if view.device_type != KDL_CUDA or view.device_id != int(self.device or 0):
            raise ConcordiaError(f"the tensor is on {device_text(view)}, not on CUDA device "
                                 f"{int(self.device or 0)} (wrap it on a backend of that device)")
        return view.pointer, view.dtype, view.size, (tensor, view.capsule)

    def _load(self, cubin: bytes, name: str):
        driver = _driver()
        module = _check(driver.cuModuleLoadData(cubin), "cuModuleLoadData")
        return _check(driver.cuModuleGetFunction(module, name.encode()), "cuModuleGetFunction")

    def compile(self, kernel):
        """The loaded CUfunction of an IR kernel (compiled once, then cached)."""
        self.activate()
        return self.kernels.get(kernel, lambda src: compile_cuda(src, self.arch),
                                lambda cubin: self._load(cubin, kernel.name)).handle

    def launch(self, kernel, args, global_size, local_size):
        self.launch_on(0, kernel, args, global_size, local_size)

    # -- streams (see Backend): a stream is a CUstream or its integer handle (torch's
    # `stream.cuda_stream`); 0 is the legacy default stream
    streams = True

    def launch_on(self, stream, kernel, args, global_size, local_size):
        """Returns the parameter block (a caller whose kernel outlives the call keeps it)."""
        fn = self.compile(kernel)
        holders, params = _param_block(args)
        grid = [g // l for g, l in zip(global_size, local_size)]
        _check(_driver().cuLaunchKernel(fn, *grid, *local_size, 0, stream, params.ctypes.data, 0),
               f"launch of {kernel.name}")
        return holders, params

    def bind(self, kernel, args, local_size):
        """The parameter block is built once: a bound launch is one cuLaunchKernel call."""
        fn = self.compile(kernel)
        holders, params = _param_block(args)
        launch, name = _driver().cuLaunchKernel, kernel.name

        def bound(groups: int, stream=0, _keep=(holders, params)):
            err = launch(fn, groups, 1, 1, *local_size, 0, stream or 0, params.ctypes.data, 0)
            if err[0] != 0:
                _check(err, f"launch of {name}")
        return bound

    graphs = True

    def capture(self, *records, first=None):
        """What each `record(stream)` enqueues, captured once as a CUDA graph and instantiated:
        launch_graph replays it with one call (the buffers and pinned sources it names are
        read again at each replay). Each record is a branch of its own, forked after
        `first(stream)` (what every branch needs) and joined at the graph's end: independent
        chains run side by side instead of one node after another."""
        with self._capturing:
            return self._capture(records, first)

    def _capture(self, records, first):
        driver = _driver()
        stream = self.new_stream()
        while len(self._branch_streams) < len(records) - 1:
            self._branch_streams.append(self.new_stream())
        mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        # no collection while capturing: a finalizer it runs in this thread (another library's
        # pinned-memory free, event destroy) is an unsafe call that invalidates the capture
        # (seen on an H100: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, now and then). Disabled,
        # not collected first: with torch and transformers loaded a full collection took
        # 0.46 s, four of them inside the Hugging Face guard's first checkpoint (H100)
        collecting = gc.isenabled()
        gc.disable()
        _check(driver.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
        marks = []   # the fork and join events: graph edges once captured, then destroyed
        try:
            if first is not None:
                first(stream)
            marks.append(self.record_event(stream))
            for record, branch in zip(records[1:], self._branch_streams):
                _check(driver.cuStreamWaitEvent(branch, marks[0], 0), "cuStreamWaitEvent")
                record(branch)
                marks.append(self.record_event(branch))
            if records:
                records[0](stream)
            for join in marks[1:]:
                _check(driver.cuStreamWaitEvent(stream, join, 0), "cuStreamWaitEvent")
        finally:
            if collecting:
                gc.enable()
            graph = _check(driver.cuStreamEndCapture(stream), "cuStreamEndCapture")
        # instantiated and uploaded now: either may wait for the device to be idle, which it
        # never is once a resident kernel runs (seen on an H100: instantiate hung beside one)
        exe = _check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        _check(driver.cuGraphUpload(exe, stream), "cuGraphUpload")
        _check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        # what only the capture needed goes now (each guard of a generate call left its four
        # graphs' templates, streams and events behind)
        _check(driver.cuGraphDestroy(graph), "cuGraphDestroy")
        _check(driver.cuStreamDestroy(stream), "cuStreamDestroy")
        for mark in marks:
            self.destroy_event(mark)
        return exe

    def destroy_graph(self, graph):
        self.activate()
        _check(_driver().cuGraphExecDestroy(graph), "cuGraphExecDestroy")

    def destroy_event(self, event):
        self.activate()
        _check(_driver().cuEventDestroy(event), "cuEventDestroy")

    def launch_graph(self, graph, stream):
        _check(_driver().cuGraphLaunch(graph, stream), "cuGraphLaunch")

    def memset32_on(self, stream, handle, value: int, count: int):
        self.activate()
        _check(_driver().cuMemsetD32Async(handle, value, count, stream), "cuMemsetD32Async")

    def new_stream(self):
        driver = _driver()
        self.activate()
        return _check(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING),
                      "cuStreamCreate")

    def side_stream(self):
        if self._side_stream is None:
            self._side_stream = self.new_stream()
        return self._side_stream

    def stream_wait(self, stream, event) -> None:
        if event is not None:
            _check(_driver().cuStreamWaitEvent(stream, event, 0), "cuStreamWaitEvent")

    def copy_device_on(self, stream, dst, src, nbytes):
        self.activate()
        _check(_driver().cuMemcpyDtoDAsync(dst, src, nbytes, stream), "cuMemcpyDtoDAsync")

    def copy_in_on(self, stream, handle, host):
        self.activate()
        _check(_driver().cuMemcpyHtoDAsync(handle, host.ctypes.data, host.nbytes, stream),
               "cuMemcpyHtoDAsync")

    def copy_out_on(self, stream, handle, host):
        self.activate()
        _check(_driver().cuMemcpyDtoHAsync(host.ctypes.data, handle, host.nbytes, stream),
               "cuMemcpyDtoHAsync")

    def record_event(self, stream, event=None):
        driver = _driver()
        self.activate()
        if event is None:   # a blocking-sync event: its waiter sleeps instead of spinning
            flags = (driver.CUevent_flags.CU_EVENT_DISABLE_TIMING
                     | driver.CUevent_flags.CU_EVENT_BLOCKING_SYNC)
            event = _check(driver.cuEventCreate(flags), "cuEventCreate")
        _check(driver.cuEventRecord(event, stream), "cuEventRecord")
        return event

    def wait_event(self, event) -> None:
        self.activate()
        _check(_driver().cuEventSynchronize(event), "cuEventSynchronize")   # the GIL released

    def event_done(self, event) -> bool:
        driver = _driver()
        self.activate()
        err, = driver.cuEventQuery(event)
        if err == driver.CUresult.CUDA_ERROR_NOT_READY:
            return False
        _check((err,), "cuEventQuery")
        return True

    def pinned(self, nbytes):
        self.activate()
        ptr = _check(_driver().cuMemHostAlloc(max(nbytes, 1), 0), "cuMemHostAlloc")
        self._pinned_blocks[int(ptr)] = ptr
        return _host_view(ptr, max(nbytes, 1))

    def free_pinned(self, host):
        ptr = self._pinned_blocks.pop(host.ctypes.data, None)
        if ptr is not None:
            self.activate()
            _check(_driver().cuMemFreeHost(ptr), "cuMemFreeHost")

    def synchronize(self):
        """Wait for the device; while a detached (persistent) kernel is resident, for the
        legacy stream only: that kernel never ends by itself, so a context-wide wait would
        never return (every launch and copy of this backend's own is on the legacy stream)."""
        self.activate()
        self.detached = [run for run in self.detached if not run.done()]
        if self.detached:
            _check(_driver().cuStreamSynchronize(0), "cuStreamSynchronize")
        else:
            _check(_driver().cuCtxSynchronize(), "cuCtxSynchronize")


def _param_block(args):
    """cuLaunchKernel's kernelParams for handles and numpy scalars: (holders, pointer array)."""
    holders = [np.array([int(a)], np.uint64) if not isinstance(a, np.generic)
               else np.array([a], np.uint8 if a.dtype == np.bool_ else a.dtype) for a in args]
    return holders, np.array([h.ctypes.data for h in holders], dtype=np.uint64)


def _host_view(ptr, nbytes: int) -> np.ndarray:
    """Host memory the driver allocated, as a numpy byte array (no copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(ptr)))


def _device_name(dev) -> str:
    _, name = _driver().cuDeviceGetName(128, dev)
    return name.split(b"\0")[0].decode()


def _arch(dev) -> str:
    driver = _driver()
    attr = driver.CUdevice_attribute
    _, major = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
    _, minor = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
    return f"sm_{major}{minor}"




@register_backend("hip-on-cuda")
class HipOnCudaBackend(CUDABackend):
    """The HIP lowering, compiled by NVRTC through a small compatibility header, on NVIDIA."""
    target = "hip"

    @classmethod
    def render(cls, kernel) -> str:
        header = os.path.join(INCLUDE_DIR, "hip_on_cuda.h")
        with open(header) as fh:
            return fh.read() + "\n" + render_source(kernel, "hip")

"""`opencl` via pyopencl: pocl's CPU device on a machine without a GPU, any vendor's GPU else.

Device strings: "opencl" (a GPU if there is one, else the first device), "opencl:N" (the
N-th device over all platforms, as `concordia backends` lists them), "opencl:gpu", "opencl:cpu".
"""
from __future__ import annotations

import os
import sys
import warnings

import numpy as np

from concordia_ir.errors import BackendUnavailable, ConcordiaError
from concordia.lowering.compile import OPENCL_OPTIONS
from concordia.lowering.target import Options, Target

from .base import Availability, Backend, register_backend
from .compiled import CompiledKernels


def _devices():
    import pyopencl as cl
    out = []
    for p in cl.get_platforms():
        try:
            out.extend(p.get_devices())
        except cl.Error:
            continue  # a platform with no devices (e.g. an ICD without its driver)
    return out


def _is_gpu(dev) -> bool:
    import pyopencl as cl
    return bool(dev.type & cl.device_type.GPU)


@register_backend("opencl")
class OpenCLBackend(Backend):
    @classmethod
    def probe(cls) -> Availability:
        try:
            import pyopencl as cl
        except ImportError:
            return Availability(False, "pyopencl is not installed: pip install 'pyopencl[pocl]'")
        try:
            devs = _devices()
        except cl.Error as e:
            return Availability(False, f"no OpenCL platform ({e}); install an ICD such as "
                                       "pocl-opencl-icd, or pip install 'pyopencl[pocl]'")
        if not devs:
            return Availability(False, "OpenCL found no device; install pocl-opencl-icd or a GPU driver")
        names = tuple(f"{i}: {d.platform.name.strip()} / {d.name.strip()} "
                      f"({'GPU' if _is_gpu(d) else 'CPU'})" for i, d in enumerate(devs))
        return Availability(True, devices=names, gpu=any(_is_gpu(d) for d in devs),
                            versions={"pyopencl": cl.VERSION_TEXT})

    def __init__(self, device: str | None = None):
        super().__init__(device)
        self._host_backed: dict[int, np.ndarray] = {}   # buffer address -> the host bytes under it
        self.detached_queue = None   # queues beside the main one, made on first use
        self.control_queue = None
        import pyopencl as cl
        self.cl = cl
        self.build_log = ""   # the last program build's log (see _quiet_build)
        devs = _devices()
        if device is None:
            gpus = [d for d in devs if _is_gpu(d)]
            dev = (gpus or devs)[0]
        elif device in ("gpu", "cpu"):
            match = [d for d in devs if _is_gpu(d) == (device == "gpu")]
            if not match:
                raise BackendUnavailable(f"no OpenCL {device.upper()} device here")
            dev = match[0]
        else:
            try:
                dev = devs[int(device)]
            except (ValueError, IndexError):
                raise BackendUnavailable(f"OpenCL device {device!r} does not exist; "
                                         f"there are {len(devs)} (see `concordia backends`)") from None
        self.dev = dev
        self.ctx = cl.Context([dev])
        self.queue = cl.CommandQueue(self.ctx)
        toolchain = f"{dev.platform.version}|{dev.name}|{dev.driver_version}"
        self.kernels = CompiledKernels(Target("opencl", dev.name), Options(OPENCL_OPTIONS, toolchain),
                                       "clbin")

    def device_info(self) -> dict:
        return {"backend": "opencl", "device": self.dev.name.strip(),
                "platform": self.dev.platform.name.strip(), "version": self.dev.version}

    def alloc(self, nbytes: int):
        return self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE, nbytes)

    def free(self, handle):
        handle.release()

    def copy_in(self, handle, host):
        self.cl.enqueue_copy(self.queue, handle, np.ascontiguousarray(host), is_blocking=True)

    def copy_out(self, handle, host):
        self.cl.enqueue_copy(self.queue, host, handle, is_blocking=True)

    def alloc_control(self, nbytes: int):
        """On a CPU device, a buffer over host memory: the kernel polls the very bytes the host
        writes (pocl does not run a copy beside a running kernel). On a GPU, device memory
        written through a second queue."""
        if _is_gpu(self.dev):
            return self.alloc(nbytes)
        host = np.zeros(max(nbytes, 64), np.uint8)
        buf = self.cl.Buffer(self.ctx, self.cl.mem_flags.READ_WRITE | self.cl.mem_flags.USE_HOST_PTR,
                             hostbuf=host)
        self._host_backed[buf.int_ptr] = host
        return buf

    def alloc_mapped(self, nbytes):
        """CPU devices only: a buffer over host memory that the kernel and host share. OpenCL
        1.2 promises no coherence with a running kernel on a GPU (that needs fine-grained SVM)."""
        if _is_gpu(self.dev):
            raise ConcordiaError(f"OpenCL on {self.dev.name.strip()} (a GPU) has no coherent "
                                 "host-mapped memory here; run the task ring on cuda, or on an "
                                 "OpenCL CPU device")
        buf = self.alloc_control(nbytes)
        return buf, self._host_backed[buf.int_ptr]

    def resident_groups(self):
        return int(self.dev.max_compute_units)

    def launch_detached(self, kernel, args, global_size, local_size):
        knl = self.compile(kernel)
        knl.set_args(*[np.uint8(a) if isinstance(a, np.bool_) else a for a in args])
        if self.detached_queue is None:
            self.detached_queue = self.cl.CommandQueue(self.ctx)   # beside the main queue
        event = self.cl.enqueue_nd_range_kernel(self.detached_queue, knl, global_size, local_size)
        self.detached_queue.flush()
        cl = self.cl

        class Run:
            def done(self) -> bool:
                status = event.command_execution_status
                if status < 0:
                    raise ConcordiaError(f"OpenCL kernel {kernel.name} failed (status {status})")
                return status == cl.command_execution_status.COMPLETE

            def wait(self, timeout=None) -> bool:
                event.wait()
                return self.done()
        return Run()

    def write_control(self, handle, host):
        backing = self._host_backed.get(handle.int_ptr)
        if backing is not None:
            raw = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
            backing[:raw.size] = raw
            return
        if self.control_queue is None:
            self.control_queue = self.cl.CommandQueue(self.ctx)   # not behind running kernels
        self.cl.enqueue_copy(self.control_queue, handle, np.ascontiguousarray(host), is_blocking=True)

    def prepare(self, kernel):
        self.compile(kernel)

    def copy_device(self, dst, src, nbytes):
        self.cl.enqueue_copy(self.queue, dst, src, byte_count=nbytes)

    def _build(self, source: str) -> bytes:
        prg = self.cl.Program(self.ctx, source)
        try:
            self._quiet_build(prg)
        except self.cl.RuntimeError as e:   # the message carries the build log
            raise ConcordiaError(f"OpenCL build failed on {self.dev.name.strip()}: "
                                 f"{' '.join(str(e).split())}") from None
        return prg.get_info(self.cl.program_info.BINARIES)[0]

    def _quiet_build(self, prg):
        """Build without pyopencl's CompilerWarning (NVIDIA's compiler always says something):
        the log is kept in `build_log`, shown on failure, or printed with CONCORDIA_VERBOSE=1."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self.cl.CompilerWarning)
            prg.build(options=list(OPENCL_OPTIONS))
        self.build_log = prg.get_build_info(self.dev, self.cl.program_build_info.LOG).strip()
        if self.build_log and os.environ.get("CONCORDIA_VERBOSE"):
            print(f"OpenCL build log ({self.dev.name.strip()}):\n{self.build_log}", file=sys.stderr)

    def _load(self, binary: bytes):
        prg = self.cl.Program(self.ctx, [self.dev], [binary])
        self._quiet_build(prg)
        return prg

    def compile(self, kernel):
        """The built cl.Kernel of an IR kernel (compiled once, then cached)."""
        return self.kernels.get(kernel, self._build,
                                lambda binary: self.cl.Kernel(self._load(binary), kernel.name)).handle

    def launch(self, kernel, args, global_size, local_size):
        knl = self.compile(kernel)
        knl.set_args(*[np.uint8(a) if isinstance(a, np.bool_) else a for a in args])
        self.cl.enqueue_nd_range_kernel(self.queue, knl, global_size, local_size)

    def synchronize(self):
        self.queue.finish()

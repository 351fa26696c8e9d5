"""`hip` via hip-python: code objects from clang (lowering.compile.compile_hip), loaded and
launched through the HIP module API. Without ROCm hardware, `probe()` says why and the HIP
lowering is tested by compiling it for gfx1201 and by running it as `hip-on-cuda`.
"""
from __future__ import annotations

import ctypes

import numpy as np

from concordia_ir.errors import BackendUnavailable, ConcordiaError
from concordia.lowering.compile import HIP_OPTIONS, clang_version, compile_hip, find_hip_clang
from concordia.lowering.target import Options, Target

from .base import Availability, Backend, register_backend
from .compiled import CompiledKernels

_CTYPES = {"int32": ctypes.c_int32, "uint32": ctypes.c_uint32, "int64": ctypes.c_int64,
           "uint64": ctypes.c_uint64, "float32": ctypes.c_float, "float64": ctypes.c_double,
           "bool": ctypes.c_uint8}


def _hip():
    from hip import hip
    return hip


def _check(result, what: str):
    hip = _hip()
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != hip.hipError_t.hipSuccess:
        raise ConcordiaError(f"HIP {what} failed: {err.name}")
    return rest[0] if len(rest) == 1 else rest


@register_backend("hip")
class HIPBackend(Backend):
    @classmethod
    def probe(cls) -> Availability:
        try:
            hip = _hip()
        except ImportError:
            return Availability(False, "hip-python is not installed (pip install hip-python) and "
                                       "a ROCm runtime is needed; HIP code can still be compiled: "
                                       "concordia compile --target hip --arch gfx1201")
        try:
            err, count = hip.hipGetDeviceCount()
        except RuntimeError:  # hip-python raises when libamdhip64.so cannot be loaded
            return Availability(False, "the ROCm runtime (libamdhip64.so) is not installed; "
                                       "install ROCm >= 6.2 for an AMD GPU")
        if err != hip.hipError_t.hipSuccess or count == 0:
            return Availability(False, "ROCm found no AMD GPU")
        if find_hip_clang() is None:
            return Availability(False, "no clang with AMDGPU support: apt-get install clang-19 lld-19")
        devices = []
        for i in range(count):
            props = _check(hip.hipGetDeviceProperties(i), "hipGetDeviceProperties")
            devices.append(f"{i}: {props.name.decode()} ({_arch_of(props)})")
        return Availability(True, devices=tuple(devices), gpu=True,
                            versions={"clang": clang_version(find_hip_clang())})

    def __init__(self, device: str | None = None):
        super().__init__(device)
        hip = _hip()
        try:
            self.ordinal = int(device or 0)
        except ValueError:
            raise BackendUnavailable(f"HIP device must be a number, got {device!r}") from None
        _check(hip.hipSetDevice(self.ordinal), "hipSetDevice")
        props = _check(hip.hipGetDeviceProperties(self.ordinal), "hipGetDeviceProperties")
        self.arch = _arch_of(props)
        self.kernels = CompiledKernels(Target("hip", self.arch),
                                       Options(HIP_OPTIONS, clang_version(find_hip_clang())), "co")

    def alloc(self, nbytes: int):
        return _check(_hip().hipMalloc(nbytes), "hipMalloc")

    def free(self, handle):
        _check(_hip().hipFree(handle), "hipFree")

    def copy_in(self, handle, host):
        hip = _hip()
        host = np.ascontiguousarray(host)
        _check(hip.hipMemcpy(handle, host, host.nbytes, hip.hipMemcpyKind.hipMemcpyHostToDevice),
               "hipMemcpy H2D")

    def copy_out(self, handle, host):
        hip = _hip()
        _check(hip.hipMemcpy(host, handle, host.nbytes, hip.hipMemcpyKind.hipMemcpyDeviceToHost),
               "hipMemcpy D2H")

    def _load(self, code_object: bytes, name: str):
        hip = _hip()
        module = _check(hip.hipModuleLoadData(code_object), "hipModuleLoadData")
        return _check(hip.hipModuleGetFunction(module, name.encode()), "hipModuleGetFunction")

    def launch(self, kernel, args, global_size, local_size):
        hip = _hip()
        fn = self.kernels.get(kernel, lambda src: compile_hip(src, self.arch),
                              lambda co: self._load(co, kernel.name)).handle
        extra = tuple(_CTYPES[a.dtype.name](a.item()) if isinstance(a, np.generic) else a
                      for a in args)
        grid = [g // l for g, l in zip(global_size, local_size)]
        _check(hip.hipModuleLaunchKernel(fn, *grid, *local_size, sharedMemBytes=0, stream=None,
                                         kernelParams=None, extra=extra), f"launch of {kernel.name}")

    def synchronize(self):
        _check(_hip().hipDeviceSynchronize(), "hipDeviceSynchronize")


def _arch_of(props) -> str:
    return props.gcnArchName.decode().split(":")[0]

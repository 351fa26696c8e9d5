"""`tenstorrent`: kernels on Tensix cores, in two tiers (docs/tenstorrent.md).

The tile tier (lowering/tt_lang.py) runs kernels that map onto 32x32 tiles as TT-Lang
programs: on `tt-lang-sim` by default ("tenstorrent" or "tenstorrent:sim"), on a device
through ttnn when one is present ("tenstorrent:0"). The scalar tier (lowering/tt_metalium.py)
runs everything else as TT-Metalium C++ on the cores' RISC-V processors; without hardware it
is validated by compiling that same C++ for this host against a shim of the dataflow API —
the `tenstorrent-scalar-host` backend, which is a validation target, not a device.

Device memory is host memory standing in for DRAM (the simulator's tensors are host tensors
too); on hardware, buffers would be ttnn device tensors and copies would cross PCIe.
"""
from __future__ import annotations

import ctypes
import os
import threading

import numpy as np

from concordia_ir.errors import BackendUnavailable, ConcordiaError, KernelRuntimeError
from concordia_ir.types import PtrType
from lowering import tt_metalium

from .base import Availability, Backend, register_backend
from .compiled import CompiledKernels


class _HostMemoryBackend(Backend):
    """Buffers are numpy byte arrays; launches may run in a thread so that a pause can land."""

    def alloc(self, nbytes: int):
        return np.zeros(max(nbytes, 1), dtype=np.uint8)

    def copy_in(self, handle, host):
        raw = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        handle[:raw.size] = raw

    def copy_out(self, handle, host):
        raw = host.reshape(-1).view(np.uint8)
        raw[:] = handle[:raw.size]

    def copy_device(self, dst, src, nbytes):
        dst[:nbytes] = src[:nbytes]

    def launch(self, kernel, args, global_size, local_size):
        self.synchronize()
        self._run(kernel, args, global_size, local_size)

    def launch_async(self, kernel, args, global_size, local_size):
        self.synchronize()
        self.prepare(kernel)   # compile in the caller's thread: errors surface at the launch

        def run():
            try:
                self._run(kernel, args, global_size, local_size)
            except BaseException as e:   # re-raised by synchronize() in the caller's thread
                self._error = e
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def synchronize(self):
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join()
            self._thread = None
        err = getattr(self, "_error", None)
        if err is not None:
            self._error = None
            raise err


class ScalarTierHost:
    """Runs IR kernels as TT-Metalium C++ built for this host (one core, groups in turn)."""

    def __init__(self):
        cxx = tt_metalium.host_compiler()
        self.kernels = CompiledKernels("tt-metalium-host", "host", tt_metalium.toolchain_id(cxx),
                                       tt_metalium.HOST_OPTIONS, "so",
                                       render=tt_metalium.render_metalium)
        self.libs: dict[str, ctypes.CDLL] = {}

    def load(self, binary: bytes):
        import hashlib
        import tempfile
        from lowering.cache import cache_dir
        key = hashlib.sha256(binary).hexdigest()[:24]
        if key not in self.libs:
            d = os.path.join(cache_dir(), "tt-host-libs")
            os.makedirs(d, exist_ok=True)
            path = os.path.join(d, f"{key}.so")
            if not os.path.exists(path):
                fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
                with os.fdopen(fd, "wb") as fh:
                    fh.write(binary)
                os.replace(tmp, path)
            lib = ctypes.CDLL(path)
            lib.cc_run.argtypes = [ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32,
                                   ctypes.POINTER(ctypes.c_uint32)]
            lib.cc_run.restype = None
            self.libs[key] = lib
        return self.libs[key]

    def prepare(self, kernel):
        return self.kernels.get(kernel, tt_metalium.compile_host, self.load)

    def run(self, kernel, args, global_size, local_size):
        lib = self.prepare(kernel)
        n_groups = int(np.prod([g // l for g, l in zip(global_size, local_size)]))
        words = [*global_size, *local_size, 0, n_groups]
        for p, a in zip(kernel.params, args):
            if isinstance(p.type, PtrType):
                addr = a.ctypes.data
                words += [addr & 0xFFFFFFFF, addr >> 32, a.nbytes]
            else:
                raw = np.asarray(a, dtype=p.type.dtype).reshape(1)
                raw = np.pad(raw.view(np.uint8), (0, (-raw.nbytes) % 4)).view(np.uint32)
                words += [int(w) for w in raw]
        arr = (ctypes.c_uint32 * len(words))(*[w & 0xFFFFFFFF for w in words])
        fault = (ctypes.c_uint32 * 4)()
        lib.cc_run(arr, len(words), fault)
        if fault[0]:
            word = fault[1]
            names, w = {}, tt_metalium.LAUNCH_WORDS
            for p in kernel.params:
                names[w] = p.name
                w += 3 if isinstance(p.type, PtrType) else (2 if p.type.bits == 64 else 1)
            index = np.array([fault[2] | (fault[3] << 32)], np.uint64).view(np.int64)[0]
            raise KernelRuntimeError(f"kernel '{kernel.name}': access out of bounds: index "
                                     f"{index} into %{names.get(word, '?')} (tenstorrent scalar tier)")


def _scalar_probe() -> Availability:
    cxx = tt_metalium.host_compiler()
    if cxx is None:
        return Availability(False, "no C++ compiler on PATH (apt install g++): the scalar tier "
                                   "is validated by building its TT-Metalium C++ for this host")
    return Availability(True, devices=("TT-Metalium C++ on this host's CPU (validation, not a "
                                       "Tenstorrent device)",), versions={"cxx": cxx})


@register_backend("tenstorrent-scalar-host")
class TenstorrentScalarHostBackend(_HostMemoryBackend):
    """Every kernel through the scalar tier, compiled for this host: checks that lowering."""

    @classmethod
    def probe(cls) -> Availability:
        return _scalar_probe()

    def __init__(self, device: str | None = None):
        super().__init__(device)
        if not _scalar_probe().ok:
            raise BackendUnavailable(_scalar_probe().reason)
        self.scalar = ScalarTierHost()

    def prepare(self, kernel):
        self.scalar.prepare(kernel)

    def _run(self, kernel, args, global_size, local_size):
        self.scalar.run(kernel, args, global_size, local_size)

    def device_info(self):
        return {"backend": self.name, "device": "host CPU (TT-Metalium scalar tier, validation)"}

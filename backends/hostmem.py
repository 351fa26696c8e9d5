"""Backends whose device memory is host memory (numpy byte arrays): the reference interpreter
and the Tenstorrent simulator / scalar-tier host run. Launches may run in a thread, so that the
host can pause a kernel while it runs; a persistent kernel's ring is the memory itself."""
from __future__ import annotations

import threading

import numpy as np

from .base import Backend, wrap_host_dlpack


def typed(handle: np.ndarray, dtype) -> np.ndarray:
    """A byte buffer seen as elements of dtype (a trailing partial element is left out)."""
    dtype = np.dtype(dtype)
    return handle[:handle.size - handle.size % dtype.itemsize].view(dtype)


class HostMemoryBackend(Backend):
    """Subclasses provide `_run(kernel, args, global_size, local_size)`."""

    def __init__(self, device: str | None = None):
        super().__init__(device)
        self._thread = None   # the detached launch's thread (launch_async)
        self._error = None    # what it raised, re-raised by synchronize()

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

    def wrap_dlpack(self, tensor):
        return wrap_host_dlpack(self.name, tensor)

    def resident_groups(self):
        return 1   # groups run in lock-step or one after another: a spinning one stalls the rest

    parts = True

    def offset(self, handle, nbytes):
        return handle[nbytes:]

    def address(self, handle):
        return handle.ctypes.data

    def alloc_mapped(self, nbytes):
        handle = self.alloc(nbytes)
        return handle, handle

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
        t = self._thread
        if t is not None:
            t.join()
            self._thread = None
        err = self._error
        if err is not None:
            self._error = None
            raise err

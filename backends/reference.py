"""`reference`: the numpy interpreter as a backend. Always available; the conformance oracle."""
from __future__ import annotations

import numpy as np

from concordia_ir.interpreter import Interpreter

from .base import Availability, Backend, register_backend, wrap_host_dlpack


@register_backend("reference")
class ReferenceBackend(Backend):
    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, devices=("numpy interpreter",),
                            versions={"numpy": np.__version__})

    def alloc(self, nbytes: int):
        return np.zeros(nbytes, dtype=np.uint8)

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
        return 1   # the interpreter runs groups in lock-step: one spinning group stalls the rest

    def alloc_mapped(self, nbytes):
        handle = self.alloc(nbytes)
        return handle, handle

    def launch_async(self, kernel, args, global_size, local_size):
        """Interpret in a thread, so that the host can pause the kernel while it runs."""
        import threading
        self.synchronize()

        def run():
            try:
                self._interpret(kernel, args, global_size, local_size)
            except BaseException as e:  # re-raised by synchronize() in the caller's thread
                self._error = e
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def write_control(self, handle, host):
        self.copy_in(handle, host)   # numpy memory: the interpreter sees it at its next poll

    def synchronize(self):
        t = getattr(self, "_thread", None)
        if t is not None:
            t.join()
            self._thread = None
        err = getattr(self, "_error", None)
        if err is not None:
            self._error = None
            raise err

    def launch(self, kernel, args, global_size, local_size):
        self.synchronize()
        self._interpret(kernel, args, global_size, local_size)

    def _interpret(self, kernel, args, global_size, local_size):
        views = []
        for p, a in zip(kernel.params, args):
            if hasattr(p.type, "elem"):
                usable = a.size - a.size % p.type.elem.dtype.itemsize
                views.append(a[:usable].view(p.type.elem.dtype))
            else:
                views.append(a)
        Interpreter(kernel).run(views, global_size, local_size)

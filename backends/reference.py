"""`reference`: the numpy interpreter as a backend. Always available; the conformance oracle."""
from __future__ import annotations

import numpy as np

from concordia_ir.interpreter import Interpreter

from .base import Availability, register_backend
from .hostmem import HostMemoryBackend


@register_backend("reference")
class ReferenceBackend(HostMemoryBackend):
    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, devices=("numpy interpreter",),
                            versions={"numpy": np.__version__})

    def _run(self, kernel, args, global_size, local_size):
        views = []
        for p, a in zip(kernel.params, args):
            if hasattr(p.type, "elem"):
                usable = a.size - a.size % p.type.elem.dtype.itemsize
                views.append(a[:usable].view(p.type.elem.dtype))
            else:
                views.append(a)
        Interpreter(kernel).run(views, global_size, local_size)

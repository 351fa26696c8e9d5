"""`reference`: the numpy interpreter as a backend. Always available; the conformance oracle."""
from __future__ import annotations

import numpy as np

from concordia_ir.interpreter import Interpreter

from .base import Availability, register_backend
from .hostmem import HostMemoryBackend, typed


@register_backend("reference")
class ReferenceBackend(HostMemoryBackend):
    @classmethod
    def probe(cls) -> Availability:
        return Availability(True, devices=("numpy interpreter",),
                            versions={"numpy": np.__version__})

    def _run(self, kernel, args, global_size, local_size):
        views = [typed(a, p.type.elem.dtype) if hasattr(p.type, "elem") else a
                 for p, a in zip(kernel.params, args)]
        Interpreter(kernel).run(views, global_size, local_size)

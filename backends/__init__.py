"""Device runtimes behind one interface, registered by name.

A backend is chosen by a string such as "opencl:0" or "cuda" (see backends/runtime.py: Runtime).
Importing this package never fails because a vendor library is missing: each backend's
`probe()` says whether it can run and why not.
"""
from .base import BACKENDS, Availability, Backend, backend_status, register_backend
from . import cuda, hip, opencl, reference, tenstorrent  # noqa: F401  (each registers itself)
from .runtime import DeviceBuffer, Runtime, resolve_backend

__all__ = ["BACKENDS", "Availability", "Backend", "register_backend", "backend_status",
           "Runtime", "DeviceBuffer", "resolve_backend"]

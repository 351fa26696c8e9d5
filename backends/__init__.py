"""Device runtimes behind one interface, registered by name.

A backend is chosen by a string such as "opencl:0" or "cuda" (see concordia_ir.Runtime).
Importing this package never fails because a vendor library is missing: each backend's
`probe()` says whether it can run and why not.
"""
from .base import BACKENDS, Availability, Backend, register_backend
from . import cuda, hip, opencl, reference, tenstorrent  # noqa: F401  (each registers itself)

__all__ = ["BACKENDS", "Availability", "Backend", "register_backend", "backend_status"]


def backend_status() -> dict[str, Availability]:
    """Every registered backend and whether it can run here."""
    out = {}
    for name, cls in BACKENDS.items():
        try:
            out[name] = cls.probe()
        except Exception as e:  # a broken vendor install must not break the listing
            out[name] = Availability(False, f"probe failed: {type(e).__name__}: {e}")
    return out

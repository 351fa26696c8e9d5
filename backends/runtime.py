"""`Runtime`: the user's handle on one backend: buffers, launches, configuration."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from concordia_ir.errors import BackendUnavailable, ConcordiaError, LaunchError
from concordia_ir.ops import Kernel
from concordia_ir.types import PtrType, ScalarType, scalar_for_dtype

from .base import BACKENDS, backend_status

# Which backend `Runtime()` picks when nothing names one: the first available. ":gpu" asks for
# an accelerator: an OpenCL GPU, a Tenstorrent device (its simulator is not picked by default).
PREFERENCE = ("cuda", "hip", "opencl:gpu", "tenstorrent:gpu", "opencl", "reference")
CONFIG_FILE = "concordia.toml"


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend string: 'opencl:0' -> name 'opencl', device '0'."""
    name: str
    device: str | None = None

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        name, _, device = text.strip().partition(":")
        return cls(name.lower(), device or None)

    def __str__(self) -> str:
        return f"{self.name}:{self.device}" if self.device else self.name


def _config_backend() -> tuple[str, str] | None:
    if not os.path.exists(CONFIG_FILE):
        return None
    import tomllib
    try:
        with open(CONFIG_FILE, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConcordiaError(f"{CONFIG_FILE}: cannot read: {e}") from None
    value = data.get("runtime", {}).get("backend")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConcordiaError(f"{CONFIG_FILE}: [runtime] backend must be a string like \"cuda:0\"")
    return value, CONFIG_FILE


def resolve_backend(requested: str | None = None) -> tuple[BackendSpec, str]:
    """The backend to use and where that choice came from (argument, env, file, default)."""
    for value, source in ((requested, "argument"),
                          (os.environ.get("CONCORDIA_BACKEND"), "CONCORDIA_BACKEND"),
                          *([_config_backend()] if _config_backend() else [])):
        if value:
            spec = BackendSpec.parse(value)
            if spec.name not in BACKENDS:
                raise BackendUnavailable(
                    f"unknown backend {spec.name!r} (from {source}); known: "
                    f"{', '.join(sorted(BACKENDS))}")
            return spec, source
    status = backend_status()
    for pref in PREFERENCE:
        spec = BackendSpec.parse(pref)
        st = status.get(spec.name)
        if st is not None and st.ok and (spec.device != "gpu" or st.gpu):
            return BackendSpec(spec.name), "best available"
    return BackendSpec("reference"), "best available"


class DeviceBuffer:
    """Device memory holding a 1-D array of one dtype."""

    def __init__(self, runtime: "Runtime", handle, dtype, size: int, owned: bool = True,
                 keepalive=None):
        self.runtime, self.handle = runtime, handle
        self.dtype, self.size = np.dtype(dtype), size
        self.owned = owned          # views and wrapped (DLPack) memory are not ours to free
        self._keepalive = keepalive

    def view(self, dtype) -> "DeviceBuffer":
        """The same bytes seen as another dtype (no copy)."""
        dtype = np.dtype(dtype)
        if self.nbytes % dtype.itemsize:
            raise LaunchError(f"{self.nbytes} bytes cannot be viewed as {dtype}")
        return DeviceBuffer(self.runtime, self.handle, dtype, self.nbytes // dtype.itemsize,
                            owned=False, keepalive=self)

    def part(self, first: int, count: int) -> "DeviceBuffer":
        """Elements [first, first + count) as a buffer of their own (no copy; freed with the
        whole). A mapped buffer's part has its share of `.host`."""
        if first < 0 or count < 0 or first + count > self.size:
            raise LaunchError(f"part [{first}, {first + count}) of a buffer of {self.size}")
        handle = self.runtime.backend.offset(self.handle, first * self.dtype.itemsize)
        buf = DeviceBuffer(self.runtime, handle, self.dtype, count, owned=False, keepalive=self)
        host = getattr(self, "host", None)
        if host is not None:
            buf.host = host[first:first + count]
        return buf

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def shape(self) -> tuple[int]:
        return (self.size,)

    def numpy(self) -> np.ndarray:
        out = np.empty(self.size, dtype=self.dtype)
        self.runtime.backend.synchronize()
        self.runtime.backend.copy_out(self.handle, out)
        return out

    def read(self, count: int) -> np.ndarray:
        """The first `count` elements (a partial copy to the host)."""
        out = np.empty(min(count, self.size), dtype=self.dtype)
        if out.size:
            self.runtime.backend.synchronize()
            self.runtime.backend.copy_out(self.handle, out)
        return out

    def write_prefix(self, host: np.ndarray) -> None:
        """Overwrite the first len(host) elements."""
        host = np.ascontiguousarray(host, dtype=self.dtype).reshape(-1)
        if host.size > self.size:
            raise LaunchError(f"write of {host.size} elements into a buffer of {self.size}")
        if host.size:
            self.runtime.backend.copy_in(self.handle, host)

    def write(self, host: np.ndarray) -> None:
        host = np.ascontiguousarray(host, dtype=self.dtype).reshape(-1)
        if host.size != self.size:
            raise LaunchError(f"write of {host.size} elements into a buffer of {self.size}")
        self.runtime.backend.copy_in(self.handle, host)

    def copy_from(self, other: "DeviceBuffer") -> None:
        """Device-to-device copy of another buffer's bytes (same runtime, same size)."""
        if other.runtime is not self.runtime or other.nbytes != self.nbytes:
            raise LaunchError("copy_from needs a buffer of the same size on the same runtime")
        self.runtime.backend.copy_device(self.handle, other.handle, self.nbytes)

    def __repr__(self) -> str:
        return f"<DeviceBuffer {self.size} x {self.dtype} on {self.runtime.spec}>"


def _as_kernel(k) -> Kernel:
    if isinstance(k, Kernel):
        return k
    inner = getattr(k, "kernel", None)
    if isinstance(inner, Kernel):
        return inner
    raise LaunchError(f"launch needs a @kernel function or an IR Kernel, got {type(k).__name__}")


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else \
        tuple(value) if isinstance(value, (tuple, list)) else ()
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, (int, np.integer)) for d in dims):
        raise LaunchError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    if any(d <= 0 for d in dims):
        raise LaunchError(f"{what} must be positive, got {value!r}")
    return tuple(int(d) for d in dims) + (1,) * (3 - len(dims))


def _scalar_arg(p, a, i: int):
    t: ScalarType = p.type
    label = f"argument {i} ({p.name})"
    if isinstance(a, DeviceBuffer):
        raise LaunchError(f"{label} expects a {t} scalar, got a device buffer")
    if isinstance(a, np.generic):
        if a.dtype != t.dtype:
            raise LaunchError(f"{label} expects {t} ({t.dtype}), got {a.dtype}; "
                              f"pass np.{t.dtype}(...)")
        return a
    if isinstance(a, bool) and t.kind != "bool":
        raise LaunchError(f"{label} expects {t}, got a bool")
    if isinstance(a, int) and not isinstance(a, bool) and t.is_int:
        if not t.min <= a <= t.max:
            raise LaunchError(f"{label}: {a} does not fit in {t}")
        return t.dtype.type(a)
    if isinstance(a, (int, float)) and not isinstance(a, bool) and t.is_float:
        return t.dtype.type(a)
    if isinstance(a, bool) and t.kind == "bool":
        return np.bool_(a)
    raise LaunchError(f"{label} expects a {t} scalar, got {type(a).__name__}")


class Runtime:
    """One backend, chosen by argument, $CONCORDIA_BACKEND, ./concordia.toml, or the best here.

    >>> rt = Runtime("reference")
    >>> buf = rt.to_device(np.arange(4, dtype=np.float32))
    """

    def __init__(self, backend: str | None = None):
        self.spec, self.source = resolve_backend(backend)
        cls = BACKENDS[self.spec.name]
        status = cls.probe()
        if not status.ok:
            raise BackendUnavailable(f"backend {self.spec.name!r} is not available: {status.reason}")
        self.backend = cls(self.spec.device)

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"Runtime({str(self.spec)!r})"

    # -- memory
    def empty(self, size: int, dtype=np.float32) -> DeviceBuffer:
        dtype = np.dtype(dtype)
        if scalar_for_dtype(dtype) is None:
            raise LaunchError(f"dtype {dtype} has no Concordia type "
                              "(use int32, uint32, int64, uint64, float32, float64 or bool)")
        if not isinstance(size, (int, np.integer)) or size < 0:
            raise LaunchError(f"size must be a non-negative int, got {size!r}")
        handle = self.backend.alloc(max(1, int(size) * dtype.itemsize))
        return DeviceBuffer(self, handle, dtype, int(size))

    def zeros(self, size: int, dtype=np.float32) -> DeviceBuffer:
        buf = self.empty(size, dtype)
        if size:
            buf.write(np.zeros(size, dtype))
        return buf

    def to_device(self, host) -> DeviceBuffer:
        host = np.asarray(host)
        if host.dtype == np.float16 or scalar_for_dtype(host.dtype) is None:
            raise LaunchError(f"arrays of {host.dtype} cannot go to a device yet "
                              "(use int32, uint32, int64, uint64, float32, float64 or bool)")
        buf = self.empty(host.size, host.dtype)
        if host.size:
            buf.write(host)
        return buf

    def from_dlpack(self, tensor) -> DeviceBuffer:
        """Wrap a DLPack tensor (torch, CuPy, numpy) on this runtime's device, without a copy.
        Any dtype: a type numpy lacks (bfloat16, float8, bool) is seen as unsigned integers of
        its width (see backends/dlpack.py: region_dtype); a region is its bytes."""
        handle, dtype, size, keep = self.backend.wrap_dlpack(tensor)
        return DeviceBuffer(self, handle, dtype, size, owned=False, keepalive=keep)

    def mapped(self, count: int, dtype) -> DeviceBuffer:
        """Memory the host and a running kernel share without copies (a task ring): a
        DeviceBuffer whose `.host` is a numpy view of the same bytes. Free with free_mapped."""
        dtype = np.dtype(dtype)
        handle, view = self.backend.alloc_mapped(count * dtype.itemsize)
        buf = DeviceBuffer(self, handle, dtype, count, owned=False)
        buf.host = view[:count * dtype.itemsize].view(dtype)
        return buf

    def free_mapped(self, buf: DeviceBuffer) -> None:
        if buf.handle is not None:
            self.backend.free_mapped(buf.handle)
        buf.handle = None

    def free(self, buf: DeviceBuffer) -> None:
        if buf.owned and buf.handle is not None:
            self.backend.free(buf.handle)
        buf.handle = None

    def synchronize(self) -> None:
        self.backend.synchronize()

    def read_into(self, pairs) -> None:
        """Each (DeviceBuffer, host array) pair's first host.size elements into the array, the
        device synchronised once for all of them (DeviceBuffer.read waits for each)."""
        self.backend.copy_out_many([(buf.handle, host) for buf, host in pairs if host.size])

    # -- launches
    def check_launch(self, kernel, global_size, local_size, args):
        k = _as_kernel(kernel)
        g, l = _dims(global_size, "global_size"), _dims(local_size, "local_size")
        for d, (gd, ld) in enumerate(zip(g, l)):
            if gd % ld:
                raise LaunchError(f"global_size[{d}] = {gd} is not a multiple of "
                                  f"local_size[{d}] = {ld}; round it up and guard with a bounds check")
        if l[0] * l[1] * l[2] > 1024:
            raise LaunchError(f"work-groups of {l[0] * l[1] * l[2]} work-items; at most 1024")
        args = tuple(args)
        if len(args) != len(k.params):
            names = ", ".join(p.name for p in k.params)
            raise LaunchError(f"kernel {k.name!r} takes {len(k.params)} arguments ({names}), "
                              f"got {len(args)}")
        out = []
        for i, (p, a) in enumerate(zip(k.params, args)):
            if isinstance(p.type, PtrType):
                if not isinstance(a, DeviceBuffer):
                    raise LaunchError(f"argument {i} ({p.name}) expects a device buffer of "
                                      f"{p.type.elem}, got {type(a).__name__}; use rt.to_device()")
                if a.runtime is not self:
                    raise LaunchError(f"argument {i} ({p.name}) lives on another runtime "
                                      f"({a.runtime.spec}); copy it with to_device(buf.numpy())")
                if a.dtype != p.type.elem.dtype:
                    raise LaunchError(f"argument {i} ({p.name}) expects a buffer of "
                                      f"{p.type.elem} ({p.type.elem.dtype}), got {a.dtype}")
                if a.handle is None:
                    raise LaunchError(f"argument {i} ({p.name}) was freed")
                out.append(a.handle)
            else:
                out.append(_scalar_arg(p, a, i))
        return k, g, l, out

    def launch(self, kernel, global_size, local_size=64, args=(), pausable: bool = False):
        """Run `kernel` over `global_size` work-items in groups of `local_size`.

        With pausable=True the kernel starts asynchronously and a KernelContext is returned:
        it can be paused at the kernel's safepoints, resumed, exported or migrated."""
        if pausable:
            return _kernel_contexts().context(self, kernel, global_size, local_size, args).start()
        k, g, l, handles = self.check_launch(kernel, global_size, local_size, args)
        self.backend.launch(k, handles, g, l)

    def bind(self, kernel, local_size, args):
        """A launch checked once, for a hot path: `bound(groups, stream=None)` runs `groups`
        work-groups of `local_size` with these arguments (the buffers must outlive it)."""
        k, _, l, handles = self.check_launch(kernel, local_size, local_size, args)
        return self.backend.bind(k, handles, l)

    def import_(self, path: str):
        """A paused KernelContext on this runtime from a snapshot file (ctx.export(path))."""
        return _kernel_contexts().importer(path, self)

    def migrate(self, ctx, target):
        """Move a KernelContext to `target` (a backend string or Runtime); see KernelContext.migrate."""
        return ctx.migrate(target)


@dataclass
class _KernelContexts:
    context: type       # KernelContext(runtime, kernel, global_size, local_size, args)
    importer: object    # import_snapshot(path, runtime)


_CONTEXTS: list[_KernelContexts] = []


def register_kernel_contexts(context: type, importer) -> None:
    """Kernel contexts (pause, snapshot, migrate) live a floor up, in concordia.handlers, which
    registers them here on import: the runtime never imports upward."""
    _CONTEXTS[:] = [_KernelContexts(context, importer)]


def _kernel_contexts() -> _KernelContexts:
    if not _CONTEXTS:
        raise ConcordiaError("pausable kernels need concordia.handlers: `import concordia` "
                             "(or concordia.handlers) first")
    return _CONTEXTS[0]

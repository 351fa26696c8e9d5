"""What every compiling backend shares: IR -> source -> binary, with the on-disk cache."""
from __future__ import annotations

from typing import Callable

from concordia_ir.printer import print_kernel
from concordia.lowering import render_source
from concordia.lowering.cache import KernelCache, cache_key


class CompiledKernels:
    """Per-backend memo (by kernel object) in front of the disk cache (by content)."""

    def __init__(self, target: str, arch: str, toolchain: str, options: tuple[str, ...], ext: str,
                 render: Callable | None = None):
        self.target, self.arch, self.toolchain, self.options, self.ext = \
            target, arch, toolchain, options, ext
        self.render = render or (lambda k: render_source(k, target))
        self.disk = KernelCache()
        self.memo: dict[int, tuple[object, object]] = {}

    def build(self, kernel, build_binary) -> bytes:
        """The binary (compiled now or found on disk), without loading it."""
        key = cache_key(print_kernel(kernel), self.target, self.arch, self.toolchain,
                        " ".join(self.options))
        binary = self.disk.get(key, self.ext)
        if binary is None:
            binary = build_binary(self.render(kernel))
            self.disk.put(key, self.ext, binary)
        return binary

    def get(self, kernel, build_binary, load):
        """`build_binary(source) -> bytes`; `load(binary) -> handle`. Returns the handle."""
        hit = self.memo.get(id(kernel))
        if hit is not None and hit[0] is kernel:
            return hit[1]
        key = cache_key(print_kernel(kernel), self.target, self.arch, self.toolchain,
                        " ".join(self.options))
        binary = self.disk.get(key, self.ext)
        if binary is None:
            binary = build_binary(self.render(kernel))
            self.disk.put(key, self.ext, binary)
        handle = load(binary)
        self.memo[id(kernel)] = (kernel, handle)
        return handle

"""What every compiling backend shares: IR -> source -> binary, with the on-disk cache."""
from __future__ import annotations

from typing import Callable

from concordia_ir.printer import print_kernel
from concordia.lowering import render_source
from concordia.lowering.cache import KernelCache, cache_key
from concordia.lowering.target import Options, Program, Target


class CompiledKernels:
    """Per-backend memo (by kernel object) of loaded Programs, in front of the disk cache (by
    content: the IR text, the Target and the Options)."""

    def __init__(self, target: Target, options: Options, ext: str, render: Callable | None = None):
        self.target, self.options, self.ext = target, options, ext
        self.render = render or (lambda k: render_source(k, target.backend))
        self.disk = KernelCache()
        self.memo: dict[int, Program] = {}
        # binaries built this process, by kernel object: the key is the printed IR, and a
        # Checkpointer per generate call printed the same recovery kernels each time (~2 ms)
        self.built: dict[int, tuple] = {}

    def build(self, kernel, build_binary) -> bytes:
        """The binary (compiled now or found on disk), without loading it.
        `build_binary(source) -> bytes`."""
        hit = self.built.get(id(kernel))
        if hit is not None and hit[0] is kernel:
            return hit[1]
        key = cache_key(print_kernel(kernel), str(self.target), self.options.key())
        binary = self.disk.get(key, self.ext)
        if binary is None:
            binary = build_binary(self.render(kernel))
            self.disk.put(key, self.ext, binary)
        self.built[id(kernel)] = (kernel, binary)
        return binary

    def get(self, kernel, build_binary, load) -> Program:
        """The loaded Program; `load(binary) -> handle`, kept as program.handle."""
        hit = self.memo.get(id(kernel))
        if hit is not None and hit.kernel is kernel:
            return hit
        binary = self.build(kernel, build_binary)
        program = Program(self.target, self.options, kernel, {"binary": binary}, load(binary))
        self.memo[id(kernel)] = program
        return program

"""Compilation as data (after Triton's backends/compiler.py): a frozen Target and Options that
hash into the cache key, an ordered table of stages, and the Program a backend loads.

    ir -> verified -> source -> binary

Each stage is a plain function of the previous artefact, so any of them can be dumped:
`concordia compile FILE --target cuda --emit verified|source|binary`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from concordia_ir.errors import ConcordiaError
from concordia_ir.ops import Kernel
from concordia_ir.printer import print_kernel
from concordia_ir.verifier import verify_kernel

from . import compile as _compile
from . import render_source
from .dialects import DIALECTS


@dataclass(frozen=True)
class Target:
    """What a binary is built for: a lowering (cuda, hip, opencl, tt-metalium-host, ...) and
    the device architecture (sm_90, gfx1201, the OpenCL device's name, host)."""
    backend: str
    arch: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.arch}"


@dataclass(frozen=True)
class Options:
    """Compiler flags the semantics need (no FP contraction, correct rounding) and the
    toolchain that applies them: both decide the binary, so both are in its cache key."""
    flags: tuple[str, ...] = ()
    toolchain: str = ""

    def key(self) -> str:
        return f"{self.toolchain}\0{' '.join(self.flags)}"


DEFAULT_FLAGS = {"cuda": _compile.CUDA_OPTIONS, "hip": _compile.HIP_OPTIONS,
                 "opencl": _compile.OPENCL_OPTIONS}


@dataclass
class Program:
    """One kernel through the stages, as far as it went: the artefacts of each stage, and
    (once a backend has loaded it) the backend's handle to run it."""
    target: Target
    options: Options
    kernel: Kernel
    artefacts: dict
    handle: object = None

    @property
    def source(self) -> str | None:
        return self.artefacts.get("source")

    @property
    def binary(self) -> bytes | None:
        return self.artefacts.get("binary")


@dataclass(frozen=True)
class Stage:
    name: str
    doc: str
    run: Callable   # run(artefact, target, options) -> the next artefact


def _render(kernel: Kernel, target: Target, options: Options) -> str:
    if target.backend not in DIALECTS:
        raise ConcordiaError(f"no C-family source for target {target.backend!r}; "
                             f"known: {', '.join(DIALECTS)}")
    return render_source(kernel, target.backend)


def _build(source: str, target: Target, options: Options) -> bytes:
    if target.backend == "cuda":
        return _compile.compile_cuda(source, target.arch,
                                     emit="ptx" if target.arch.startswith("compute_") else "cubin")
    if target.backend == "hip":
        return _compile.compile_hip(source, target.arch)
    raise ConcordiaError(f"the {target.backend} binary is built by its backend (it needs the "
                         "device's driver): use Runtime or `concordia compile --emit binary`")


STAGES = (
    Stage("ir", "the kernel as IR text (what the front-end or parser produced)",
          lambda k, t, o: k),
    Stage("verified", "the IR after the verifier accepted it", lambda k, t, o: verify_kernel(k)),
    Stage("source", "the target's source text (CUDA C++, HIP C++, OpenCL C)", _render),
    Stage("binary", "the compiled binary (cubin/PTX, AMDGPU code object)", _build),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def compile_program(kernel: Kernel, target: Target, options: Options | None = None,
                    until: str = "binary", stages=STAGES) -> Program:
    """Run the stages in order up to and including `until`; the Program keeps every artefact."""
    names = tuple(s.name for s in stages)
    if until not in names:
        raise ConcordiaError(f"unknown stage {until!r}; the stages are {', '.join(names)}")
    options = options or Options(DEFAULT_FLAGS.get(target.backend, ()))
    artefacts, value = {}, kernel
    for stage in stages:
        value = stage.run(value, target, options)
        artefacts[stage.name] = value
        if stage.name == until:
            break
    return Program(target, options, kernel, artefacts)


def stage_text(program: Program, stage: str) -> str | bytes:
    """What `--emit stage` writes: IR as text, source as text, a binary as bytes."""
    value = program.artefacts[stage]
    return print_kernel(value) if isinstance(value, Kernel) else value

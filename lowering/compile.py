"""Compile stages: source -> binary for each target. Each is a plain function of one artefact.

Options that the semantics need (no FP contraction, correctly rounded div/sqrt) are set here,
once per target, and are part of every cache key.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache

from concordia_ir.errors import BackendUnavailable, CompileError, ConcordiaError

OPENCL_OPTIONS = ("-cl-fp32-correctly-rounded-divide-sqrt",)
CUDA_OPTIONS = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")
HIP_OPTIONS = ("-x", "hip", "-nogpulib", "-nogpuinc", "--cuda-device-only",
               "--no-gpu-bundle-output", "-O3", "-ffp-contract=off", "-fno-fast-math")
HIP_CLANG_CANDIDATES = ("clang++-21", "clang++-20", "clang++-19", "clang++-18",
                        "/opt/rocm/llvm/bin/clang++", "clang++")


# ---- CUDA through NVRTC -----------------------------------------------------------------------

def nvrtc_version() -> str:
    from cuda.bindings import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def _nvrtc_check(result, prog=None, what="NVRTC"):
    from cuda.bindings import nvrtc
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace").strip()
        raise CompileError(f"{what} failed ({err.name}): {log}")
    return result[1:] if isinstance(result, tuple) else ()


def compile_cuda(source: str, arch: str = "sm_90", emit: str = "cubin", name: str = "kernel.cu",
                 extra_options: tuple[str, ...] = ()) -> bytes:
    """CUDA C++ -> cubin (arch sm_XX) or PTX text (emit='ptx'). Needs no GPU."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise BackendUnavailable("cuda-bindings is not installed: pip install cuda-bindings "
                                 "nvidia-cuda-nvrtc") from None
    if not re.fullmatch(r"(sm|compute)_\d+a?", arch):
        raise ConcordiaError(f"CUDA arch must look like sm_90 or compute_90, got {arch!r}")
    if arch.startswith("compute_"):
        emit = "ptx"
    target = arch if emit == "cubin" else "compute_" + arch.split("_", 1)[1]
    prog, = _nvrtc_check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    opts = [f"--gpu-architecture={target}".encode()] + [o.encode() for o in CUDA_OPTIONS + extra_options]
    try:
        _nvrtc_check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog, f"NVRTC compile of {name}")
        if emit == "cubin":
            size, = _nvrtc_check(nvrtc.nvrtcGetCUBINSize(prog))
            buf = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetCUBIN(prog, buf))
        else:
            size, = _nvrtc_check(nvrtc.nvrtcGetPTXSize(prog))
            buf = b" " * size
            _nvrtc_check(nvrtc.nvrtcGetPTX(prog, buf))
            buf = buf.rstrip(b"\0")
        return buf
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ---- HIP through clang ------------------------------------------------------------------------

@lru_cache(maxsize=1)
def find_hip_clang() -> str | None:
    env = os.environ.get("CONCORDIA_HIP_CLANG")
    if env:
        return env
    for c in HIP_CLANG_CANDIDATES:
        path = shutil.which(c)
        if path and _supports_amdgpu(path):
            return path
    return None


def _supports_amdgpu(clang: str) -> bool:
    try:
        out = subprocess.run([clang, "--version"], capture_output=True, text=True, timeout=30).stdout
        major = int(out.split("version")[1].split(".")[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return False
    return major >= 17  # gfx12 (RDNA4) targets arrived in LLVM 17/18


@lru_cache(maxsize=4)
def clang_version(clang: str) -> str:
    out = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "unknown"


def compile_hip(source: str, arch: str = "gfx1201", name: str = "kernel.hip") -> bytes:
    """HIP C++ -> an AMDGPU code object (ELF, loadable by hipModuleLoadData). Needs no GPU."""
    clang = find_hip_clang()
    if clang is None:
        raise BackendUnavailable("no clang with AMDGPU support found: apt-get install clang-19 "
                                 "lld-19 (or set CONCORDIA_HIP_CLANG)")
    with tempfile.TemporaryDirectory(prefix="concordia-hip-") as tmp:
        src, out = os.path.join(tmp, name), os.path.join(tmp, "kernel.co")
        with open(src, "w") as fh:
            fh.write(source)
        cmd = [clang, *HIP_OPTIONS, f"--offload-arch={arch}", "-c", src, "-o", out]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            if "invalid target ID" in r.stderr:
                raise ConcordiaError(f"unknown AMD GPU arch {arch!r} (e.g. gfx1201, gfx1100, gfx942)")
            raise CompileError(f"clang (HIP, {arch}) failed:\n{r.stderr.strip()}")
        with open(out, "rb") as fh:
            return fh.read()

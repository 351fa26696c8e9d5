"""The CUDA and HIP lowerings compile to real binaries here (no GPU needed), and the binaries
show the semantics' promises: no contraction, correctly rounded division and square root."""
import re
import shutil
import struct
import subprocess

import pytest

from concordia_ir.opdefs import OPS
from concordia.backends.conformance import all_cases
from concordia.backends.conformance.cases import divergent_flow, gemm_tiled, mul_add_f32, reduce_sum
from concordia.lowering import render_source
from concordia.lowering.compile import compile_cuda, compile_hip, find_hip_clang

GENERATED = re.compile(rf"^({'|'.join(OPS)})_")   # cases named after the op they test
HANDWRITTEN = [c for c in all_cases() if not GENERATED.match(c.name)]
SAMPLE = HANDWRITTEN + [c for c in all_cases() if c.name in (
    "div_i32", "rem_i64", "shr_u32", "shl_i64", "min_f32", "max_f64", "abs_i32", "neg_u64",
    "cast_f32_to_i32", "cast_f64_to_u64", "cast_bool_to_f32", "bitcast_f32_to_u32", "fma_f64",
    "sqrt_f32", "eq_f32", "popcount_i64", "clz_u32")]


def nvrtc_ok():
    try:
        import cuda.bindings.nvrtc  # noqa: F401
        from concordia.lowering.compile import nvrtc_version
        nvrtc_version()
        return True
    except Exception:
        return False


needs_nvrtc = pytest.mark.skipif(not nvrtc_ok(), reason="NVRTC not installed: pip install cuda-bindings nvidia-cuda-nvrtc")
needs_clang = pytest.mark.skipif(find_hip_clang() is None, reason="no clang with AMDGPU: apt-get install clang-19 lld-19")


def elf_header(blob: bytes):
    assert blob[:4] == b"\x7fELF" and blob[4] == 2   # ELF64
    e_type, e_machine = struct.unpack_from("<HH", blob, 16)
    (e_flags,) = struct.unpack_from("<I", blob, 48)
    return e_type, e_machine, e_flags


@needs_nvrtc
@pytest.mark.parametrize("case", SAMPLE, ids=[c.name for c in SAMPLE])
def test_cuda_cubin_for_sm90(case):
    cubin = compile_cuda(render_source(case.kernel, "cuda"), "sm_90")
    e_type, e_machine, e_flags = elf_header(cubin)
    assert e_machine == 190                       # EM_CUDA
    assert case.kernel.name.encode() in cubin


@needs_nvrtc
def test_cuda_ptx_keeps_mul_and_add_apart_and_divides_correctly_rounded():
    ptx = compile_cuda(render_source(mul_add_f32.kernel, "cuda"), "sm_90", emit="ptx").decode()
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx and "fma" not in ptx
    ptx = compile_cuda(render_source(divergent_flow.kernel, "cuda"), "compute_90").decode()
    assert "div.rn.f32" in ptx and "div.approx" not in ptx and "div.full" not in ptx


@needs_clang
@pytest.mark.parametrize("case", SAMPLE, ids=[c.name for c in SAMPLE])
def test_hip_code_object_for_gfx1201(case):
    co = compile_hip(render_source(case.kernel, "hip"), "gfx1201")
    e_type, e_machine, e_flags = elf_header(co)
    assert (e_type, e_machine) == (3, 224)        # ET_DYN, EM_AMDGPU: loadable by hipModuleLoadData
    assert e_flags & 0xFF == 0x4E                 # EF_AMDGPU_MACH_AMDGCN_GFX1201


def disassemble(co: bytes, tmp_path) -> str:
    objdump = shutil.which("llvm-objdump-19") or shutil.which("llvm-objdump")
    if objdump is None:
        pytest.skip("llvm-objdump not installed (apt-get install llvm-19)")
    f = tmp_path / "k.co"
    f.write_bytes(co)
    return subprocess.run([objdump, "-d", "--mcpu=gfx1201", str(f)], capture_output=True,
                          text=True, check=True).stdout


@needs_clang
def test_gfx1201_isa_has_no_contraction_and_exact_division(tmp_path):
    isa = disassemble(compile_hip(render_source(mul_add_f32.kernel, "hip"), "gfx1201"), tmp_path)
    assert "v_mul_f32" in isa and "v_add_f32" in isa
    assert not re.search(r"v_fma(c|k|mk)?_f32", isa)
    isa = disassemble(compile_hip(render_source(divergent_flow.kernel, "hip"), "gfx1201"), tmp_path)
    assert "v_div_fixup_f32" in isa                # IEEE division sequence, not v_rcp alone
    isa = disassemble(compile_hip(render_source(gemm_tiled.kernel, "hip"), "gfx1201"), tmp_path)
    assert "s_barrier" in isa and "ds_load" in isa and "s_endpgm" in isa


@needs_clang
def test_gfx1201_reduction_uses_lds_and_barriers(tmp_path):
    isa = disassemble(compile_hip(render_source(reduce_sum.kernel, "hip"), "gfx1201"), tmp_path)
    assert "ds_store" in isa and isa.count("s_barrier") >= 2


def test_opencl_source_disables_contraction_and_names_lines():
    src = render_source(mul_add_f32.kernel, "opencl")
    assert "#pragma OPENCL FP_CONTRACT OFF" in src
    assert "__kernel void mul_add_f32(" in src
    assert re.search(r"// cases\.py:\d+", src)


def test_rendering_is_deterministic_and_vendor_differences_are_small():
    k = gemm_tiled.kernel
    texts = {t: render_source(k, t) for t in ("opencl", "cuda", "hip")}
    assert texts["cuda"] == render_source(k, "cuda")
    body = {t: s[s.index(f"void {k.name}("):] for t, s in texts.items()}
    # same statements, differing only in spellings: the same number of lines
    assert len({b.count("\n") for b in body.values()}) == 1


def test_unknown_target_and_arch_are_clear():
    from concordia import ConcordiaError
    with pytest.raises(KeyError, match="unknown target 'metal'"):
        render_source(mul_add_f32.kernel, "metal")
    if nvrtc_ok():
        with pytest.raises(ConcordiaError, match="CUDA arch must look like sm_90"):
            compile_cuda("", "volta")


def test_disk_cache_compiles_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CONCORDIA_CACHE_DIR", str(tmp_path))
    from concordia.backends.compiled import CompiledKernels
    from concordia.lowering.target import Options, Target
    built = []

    def build(src):
        built.append(src)
        return src.encode()
    for _ in range(2):   # two backends in a row, as two processes would be
        ck = CompiledKernels(Target("opencl", "x"), Options(("-O",), "tool-1"), "bin")
        program = ck.get(mul_add_f32.kernel, build, lambda b: ("loaded", b))
        assert program.handle[0] == "loaded" and program.binary.startswith(b"// Generated")
    assert len(built) == 1
    for target, options in ((Target("opencl", "x"), Options(("-O",), "tool-2")),   # new toolchain
                            (Target("opencl", "x"), Options(("-O2",), "tool-1")),  # new flags
                            (Target("opencl", "y"), Options(("-O",), "tool-1"))):  # new device
        CompiledKernels(target, options, "bin").get(mul_add_f32.kernel, build, lambda b: b)
    assert len(built) == 4


def test_compile_program_keeps_every_stage_and_refuses_unknown_ones():
    from concordia_ir import ConcordiaError
    from concordia.lowering.target import STAGE_NAMES, Target, compile_program
    assert STAGE_NAMES == ("ir", "verified", "source", "binary")
    program = compile_program(mul_add_f32.kernel, Target("opencl", "any"), until="source")
    assert list(program.artefacts) == ["ir", "verified", "source"]
    assert program.source == render_source(mul_add_f32.kernel, "opencl")
    assert "-cl-fp32-correctly-rounded-divide-sqrt" in program.options.flags
    with pytest.raises(ConcordiaError, match="unknown stage 'asm'; the stages are ir, verified"):
        compile_program(mul_add_f32.kernel, Target("cuda", "sm_90"), until="asm")


def test_cli_emits_the_verified_ir(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "concordia", "compile", "examples/saxpy.py",
                        "--target", "cuda", "--emit", "verified"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("kernel @saxpy("), r.stderr


def test_cli_compile_binaries(tmp_path):
    import sys
    src = "examples/saxpy.py"
    if not nvrtc_ok() and find_hip_clang() is None:
        pytest.skip("neither NVRTC nor a clang with the AMDGPU target is installed")
    for target, arch, ext, magic in (("cuda", "sm_90", "cubin", b"\x7fELF"),
                                     ("hip", "gfx1201", "co", b"\x7fELF")):
        if (target == "cuda" and not nvrtc_ok()) or (target == "hip" and find_hip_clang() is None):
            continue
        out = tmp_path / f"k.{ext}"
        r = subprocess.run([sys.executable, "-m", "concordia", "compile", src, "--target",
                            target, "--arch", arch, "--emit", "binary", "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:4] == magic
    r = subprocess.run([sys.executable, "-m", "concordia", "compile", src, "--target", "hip",
                        "--arch", "gfx9999", "--emit", "binary", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True)
    if find_hip_clang() is not None:
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown AMD GPU arch" in r.stderr

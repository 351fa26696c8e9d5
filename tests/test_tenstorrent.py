"""The Tenstorrent lowering, tier by tier.

Tile tier: which kernels TT-Lang can express, the refusals' wording, and that accepted kernels
really run as tile programs on tt-lang-sim (the conformance suite compares their results with
the interpreter). Scalar tier: the TT-Metalium C++ runs on this host through the dataflow-API
shim (conformance backend `tenstorrent-scalar-host`) and builds for the baby cores' rv32im ISA.
"""
import struct
import subprocess
import sys

import numpy as np
import pytest

from concordia.backends import backend_status
from concordia.backends.conformance import all_cases, compare_outputs, expected_outputs, run_case
from concordia import Ptr, f32, f64, global_id, i32, kernel, u32
from concordia_ir.errors import KernelRuntimeError
from concordia.handlers import kernels as handler_kernels
from concordia.lowering.tt_lang import TileRefusal, plan_tiles
from concordia.lowering.tt_metalium import compile_riscv, render_metalium, riscv_compiler

STATUS = backend_status()
needs_sim = pytest.mark.skipif(not STATUS["tenstorrent"].ok,
                               reason=f"tenstorrent: {STATUS['tenstorrent'].reason}")
needs_host = pytest.mark.skipif(not STATUS["tenstorrent-scalar-host"].ok,
                                reason=f"scalar tier: {STATUS['tenstorrent-scalar-host'].reason}")
needs_riscv = pytest.mark.skipif(riscv_compiler() is None,
                                 reason="no clang for rv32im: apt-get install clang-19")


@kernel
def gather(x: Ptr[f32], idx: Ptr[i32], out: Ptr[f32]):
    i = global_id(0)
    out[i] = x[idx[i]]


@kernel
def bitwise(x: Ptr[u32], out: Ptr[u32]):
    i = global_id(0)
    out[i] = x[i] ^ u32(0x5A5A)


@kernel
def wide(x: Ptr[f64], out: Ptr[f64]):
    i = global_id(0)
    out[i] = x[i] * 2.0


@kernel
def data_loop(x: Ptr[i32], out: Ptr[i32]):
    i = global_id(0)
    acc = 0
    for k in range(x[i]):
        acc += k
    out[i] = acc


@pytest.mark.parametrize("k,why", [
    (gather, r"kernel gather: load at line \d+: the index is not global_id\(0\): a gather"),
    (bitwise, r"kernel bitwise: xor at line \d+: tiles have no bitwise ops"),
    (wide, r"buffer %x holds f64: Tensix tiles hold 32-bit types"),
    (data_loop, r"kernel data_loop: for at line \d+: a loop whose trip count depends on data"),
])
def test_tile_tier_refuses_with_the_op_and_line(k, why):
    with pytest.raises(TileRefusal, match=why):
        plan_tiles(k.kernel)


def test_tile_program_is_reader_compute_writer_over_a_grid():
    from concordia.backends.conformance.cases import vector_add
    src = plan_tiles(vector_add.kernel).source
    for part in ("@ttl.operation(grid=GRID)", "@ttl.compute()", "@ttl.datamovement()",
                 "def read():", "def write():", "ttl.node(dims=2)", "ttl.block.where("):
        assert part in src
    compile(src, "tile.py", "exec")   # valid Python on every Python the package supports


def test_tile_tier_accepts_most_32_bit_cases():
    """Every case without 64-bit types, bitwise ops, local memory or data-dependent loops."""
    accepted = []
    for c in all_cases():
        try:
            plan_tiles(c.kernel)
            accepted.append(c.name)
        except TileRefusal:
            pass
    for name in ("add_f32", "div_i32", "rem_i32", "lt_u32", "min_f32", "select_f32",
                 "cast_f32_to_bool", "micro_vector_add", "early_return_in_loop",
                 "loop_carried_swap"):
        assert name in accepted
    assert len(accepted) >= 55


@needs_sim
def test_accepted_cases_really_run_on_tiles():
    from concordia.backends.runtime import Runtime
    rt = Runtime("tenstorrent:sim")
    names = ("div_i32", "max_u32", "min_f32", "early_return_in_loop", "loop_carried_swap",
             "micro_vector_add", "ge_f32", "cast_bool_to_f32")
    for c in (c for c in all_cases() if c.name in names):
        got = run_case(c, rt)
        assert rt.backend.last_tier == "tile", c.name
        assert compare_outputs(c, got, expected_outputs(c)) is None, c.name


@needs_sim
def test_refused_kernel_runs_on_the_scalar_tier_and_says_why():
    from concordia.backends.runtime import Runtime
    rt = Runtime("tenstorrent")
    x = rt.to_device(np.arange(2048, dtype=np.uint32))
    out = rt.empty(2048, np.uint32)
    rt.launch(bitwise, global_size=2048, local_size=64, args=(x, out))
    assert rt.backend.last_tier == "scalar" and "bitwise ops" in rt.backend.last_refusal
    assert np.array_equal(out.numpy(), np.arange(2048, dtype=np.uint32) ^ 0x5A5A)


@needs_host
def test_scalar_tier_reports_out_of_bounds_instead_of_crashing():
    from concordia.backends.runtime import Runtime
    rt = Runtime("tenstorrent-scalar-host")
    x = rt.to_device(np.ones(16, np.float32))
    idx = rt.to_device(np.array([0, 1, 99, 3], np.int32))
    out = rt.empty(4, np.float32)
    with pytest.raises(KernelRuntimeError, match=r"index 99 into %x"):
        rt.launch(gather, global_size=4, local_size=4, args=(x, idx, out))


def _riscv_elf(blob: bytes):
    assert blob[:4] == b"\x7fELF" and blob[4] == 1          # ELF32
    e_type, e_machine = struct.unpack_from("<HH", blob, 16)
    return e_type, e_machine


HANDLERS = [h.kernel for h in (
    handler_kernels.page_scanner(1024, 4096), handler_kernels.page_hasher(1024, 4096),
    handler_kernels.page_gatherer(1024, 4096), handler_kernels.page_scatterer(1024, 4096))]
RISCV_SAMPLE = [c for c in all_cases() if c.name in (
    "div_i64", "shr_u64", "cast_f64_to_u32", "fma_f32", "sqrt_f64", "micro_gemm_128",
    "micro_reduction", "atomic_histogram_global", "while_collatz_u32", "early_return_in_loop",
    "bit_length_hash", "clz_u64")]


@needs_riscv
@pytest.mark.parametrize("k", [c.kernel for c in RISCV_SAMPLE] + HANDLERS,
                         ids=[c.name for c in RISCV_SAMPLE] + [h.name for h in HANDLERS])
def test_scalar_tier_builds_for_rv32im(k):
    e_type, e_machine = _riscv_elf(compile_riscv(render_metalium(k)))
    assert (e_type, e_machine) == (1, 243)                   # relocatable, EM_RISCV


def test_scalar_tier_source_uses_the_dataflow_api():
    src = render_metalium(HANDLERS[0])
    assert "void kernel_main()" in src and "cc_word(" in src
    header = (render_metalium.__globals__["INCLUDE"] / "tt" / "concordia_tt.h").read_text()
    for call in ("get_arg_val<uint32_t>", "noc_async_read(", "noc_async_write(",
                 "cb_reserve_back(", "get_write_ptr("):
        assert call in header


def cli(*args):
    return subprocess.run([sys.executable, "-m", "concordia", *args], capture_output=True,
                          text=True)


def test_compile_target_tt(tmp_path):
    src = tmp_path / "k.py"
    src.write_text("from concordia import kernel, Ptr, u32, f32, global_id\n"
                   "@kernel\ndef twice(x: Ptr[f32], out: Ptr[f32]):\n"
                   "    i = global_id(0)\n    out[i] = x[i] + x[i]\n"
                   "@kernel\ndef mix(x: Ptr[u32], out: Ptr[u32]):\n"
                   "    i = global_id(0)\n    out[i] = x[i] >> u32(3)\n")
    r = cli("compile", str(src), "--target", "tt", "--kernel", "twice")
    assert r.returncode == 0 and "@ttl.compute()" in r.stdout
    r = cli("compile", str(src), "--target", "tt", "--kernel", "mix")
    assert r.returncode == 0 and "void kernel_main()" in r.stdout
    assert "tiles have no shifts" in r.stderr
    r = cli("compile", str(src), "--target", "tt", "--kernel", "mix", "--emit", "tt-lang")
    assert r.returncode == 1 and "not expressible on tiles" in r.stderr
    assert "Traceback" not in r.stderr
    if riscv_compiler() is not None:
        out = tmp_path / "mix.o"
        r = cli("compile", str(src), "--target", "tt", "--kernel", "mix", "--emit", "binary",
                "-o", str(out))
        assert r.returncode == 0 and _riscv_elf(out.read_bytes())[1] == 243


@needs_sim
def test_conformance_cli_lists_refused_cases_with_reasons():
    r = cli("conformance", "--backend", "tenstorrent", "-k", "_u64")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tile tier: 0 of" in r.stdout
    assert "add_u64: kernel add_u64: buffer %in0 holds u64" in r.stdout


@needs_sim
def test_the_simulator_leaves_torch_dtypes_alone():
    """tt-lang-sim rebinds torch.bfloat16 to float32 on import; the backend undoes that."""
    torch = pytest.importorskip("torch")
    from concordia.backends.runtime import Runtime
    rt = Runtime("tenstorrent")
    assert torch.bfloat16 is not torch.float32 and torch.zeros(1, dtype=torch.bfloat16).element_size() == 2
    c = next(c for c in all_cases() if c.name == "add_f32")
    assert compare_outputs(c, run_case(c, rt), expected_outputs(c)) is None
    assert torch.bfloat16 is not torch.float32


@needs_sim
def test_checkpoint_handlers_run_as_tiles_and_restore_across_backends(tmp_path):
    """4 KiB pages are tiles: the dirty-page scan, gather and scatter run as TT-Lang programs.
    A region checkpointed on Tenstorrent restores elsewhere bit-exact, and back."""
    from concordia.backends.runtime import Runtime
    from concordia.handlers import Checkpointer
    rt = Runtime("tenstorrent")
    host = np.random.default_rng(3).standard_normal(5 * 1024 + 100).astype(np.float32)
    region = rt.to_device(host)
    log = str(tmp_path / "tt.clog")
    with Checkpointer(rt, {"kv": region}, log) as ck:
        assert type(ck.states[0].native).__name__ == "TilePageOps"
        assert ck.checkpoint().full
        host[1030] = 7.0
        host[5 * 1024 + 99] = -1.0                       # the short last page
        region.write(host)
        st = ck.checkpoint()
        assert (st.pages, st.full) == (2, False)
        assert ck.checkpoint().pages == 0
    other = "opencl" if STATUS["opencl"].ok else "reference"
    back = Checkpointer.restore(log, Runtime(other))["kv"].numpy()
    assert np.array_equal(back.view(np.uint32), host.view(np.uint32))
    log2 = str(tmp_path / "other.clog")
    ort = Runtime(other)
    with Checkpointer(ort, {"kv": ort.to_device(host)}, log2) as ck:
        ck.checkpoint()
    again = Checkpointer.restore(log2, rt)["kv"].numpy()   # scattered by tile copies
    assert np.array_equal(again.view(np.uint32), host.view(np.uint32))

"""Ops are declared once (concordia_ir/opdefs.py); every consumer covers every declaration.

Adding an op means its declaration, its semantics in the interpreter and a spelling in each
renderer's table: these tests fail when one of them is missing."""
import numpy as np
import pytest

from concordia_ir import IRVerifyError, KernelSyntaxError, Ptr, clz, global_id, kernel, popcount
from concordia_ir.errors import CompileError
from concordia_ir.interpreter import _ELEMENTWISE, Interpreter
from concordia_ir.opdefs import DECLARATIONS, OPS
from concordia_ir.ops import Block, Kernel, Loc, Op, Value
from concordia_ir.parser import parse_module
from concordia_ir.types import PtrType, f32, i32, i64, u32
from concordia_ir.verifier import verify_kernel
from concordia.lowering import render_source
from concordia.lowering.cstyle import CODE_FOR_OP, CStyleRenderer
from concordia.lowering.dialects import DIALECTS
from concordia.lowering.tt_lang import TileLowering
from concordia.lowering.tt_metalium import METALIUM

STATEMENTS = {"store", "barrier", "fence", "safepoint", "local_alloc", "if", "for", "while"}


def test_every_pure_op_has_interpreter_semantics():
    missing = [d.name for d in DECLARATIONS if d.pure and d.name not in _ELEMENTWISE]
    assert missing == []
    assert set(_ELEMENTWISE) <= set(OPS)


def test_every_value_op_has_a_c_spelling_and_every_statement_a_method():
    for d in DECLARATIONS:
        if d.group == "terminator":
            continue
        if d.name in STATEMENTS:
            assert hasattr(CStyleRenderer, "op_" + d.name), d.name
        else:
            assert d.name in CODE_FOR_OP, d.name
    assert set(CODE_FOR_OP) <= set(OPS)


@pytest.mark.parametrize("dialect", [*DIALECTS.values(), METALIUM], ids=lambda d: d.name)
def test_every_dialect_spells_bit_counts_for_both_widths(dialect):
    assert {f"{op}{w}" for op in ("popcount", "clz") for w in (32, 64)} <= set(dialect.bit_counts)


def test_tile_tier_expresses_or_explains_every_op():
    for d in DECLARATIONS:
        if d.group == "terminator" or hasattr(TileLowering, "op_" + d.name):
            continue
        why = TileLowering.why_not(None, Op(d.name))
        assert why and why != "no tile form", d.name


def test_a_renderer_without_the_op_names_it_its_types_and_line():
    x, r = Value("x", u32), Value("r", u32)
    p = Value("p", PtrType(u32))
    body = Block((), (Op("load", (p, Value("i", i32)), (x,)),
                      Op("popcount", (x,), (r,), loc=Loc("model.py", 42)), Op("return")))
    k = Kernel("k", (p, Value("i", i32)), body)
    renderer = CStyleRenderer(DIALECTS["cuda"])
    renderer.code_for_op = {k_: v for k_, v in CODE_FOR_OP.items() if k_ != "popcount"}
    with pytest.raises(CompileError) as e:
        renderer.render(k)
    assert str(e.value) == "model.py:42: the cuda renderer has no spelling for op 'popcount' on (u32)"


def test_the_verifier_reads_kinds_from_the_declaration():
    m = "kernel @k(%x: f32) {\n  %0 = popcount %x : f32\n  return\n}\n"
    with pytest.raises(IRVerifyError, match=r"<text>:2: kernel 'k': op 'popcount': not defined on f32"):
        verify_kernel(parse_module(m, "<text>").kernels[0])


def test_front_end_reads_kinds_from_the_declaration():
    def bad(x: Ptr[f32]):
        x[0] = popcount(x[0])
    with pytest.raises(KernelSyntaxError, match=r"popcount\(\) needs signed integers or unsigned "
                                                r"integers, got f32"):
        kernel(bad).kernel


def test_popcount_and_clz_from_python_match_python_ints():
    @kernel
    def bits(x: Ptr[i64], pc: Ptr[i64], lz: Ptr[i64]):
        i = global_id(0)
        pc[i] = popcount(x[i])
        lz[i] = clz(x[i])
    rng = np.random.default_rng(3)
    x = np.concatenate([[0, 1, -1, 2**63 - 1, -2**63], rng.integers(-2**63, 2**63 - 1, 59)]).astype(np.int64)
    pc, lz = np.zeros(64, np.int64), np.zeros(64, np.int64)
    Interpreter(bits.kernel).run([x, pc, lz], (64, 1, 1), (64, 1, 1))
    pattern = [int(v) & (2**64 - 1) for v in x]
    assert pc.tolist() == [bin(v).count("1") for v in pattern]
    assert lz.tolist() == [64 - v.bit_length() for v in pattern]
    assert "__popcll" in render_source(bits.kernel, "cuda")


CLOCK_IR = """kernel @stamp(%out: ptr<global u64>) {
  %i = global_id [dim = 0] : i32
  %t = clock : u64
  store %out, %i, %t
  return
}
"""


def test_clock_is_a_device_timestamp_spelled_where_the_target_has_one():
    k = parse_module(CLOCK_IR, "clock.ir").kernels[0]
    verify_kernel(k)
    from concordia import Runtime
    rt = Runtime("reference")
    out = rt.zeros(4, np.uint64)
    rt.launch(k, 4, 4, (out,))
    assert (out.numpy() > 0).all()          # the interpreter's clock: the host's monotonic ns
    assert "%globaltimer" in render_source(k, "cuda")
    for target in ("opencl", "hip"):
        with pytest.raises(CompileError, match=rf"clock.ir:3: the {target} renderer has no "
                                                r"spelling for op 'clock'"):
            render_source(k, target)
    bad = CLOCK_IR.replace("%t = clock : u64", "%t = clock : u32").replace("ptr<global u64>", "ptr<global u32>")
    with pytest.raises(IRVerifyError, match="clock"):
        verify_kernel(parse_module(bad, "clock.ir").kernels[0])

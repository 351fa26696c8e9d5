"""Property tests: random well-typed kernels round-trip through text, and random expression
kernels agree lane by lane between the vectorised interpreter and a plain scalar evaluator."""
import math

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from concordia import Block, Kernel, Module, Op, Value, parse_module, print_module, verify_module
from concordia_ir.interpreter import Interpreter
from concordia_ir.printer import float_from_bits, float_to_bits
from concordia_ir.types import PtrType, boolean, f32, i32, u32

from . import scalar_eval

TYPES = [i32, u32, f32]
BINARY = {"int": ["add", "sub", "mul", "div", "rem", "min", "max", "and", "or", "xor", "shl", "shr"],
          "float": ["add", "sub", "mul", "div", "rem", "min", "max"]}
UNARY = {"int": ["neg", "not", "abs"], "float": ["neg", "abs", "sqrt", "floor", "ceil"]}
COMPARE = ["eq", "ne", "lt", "le", "gt", "ge"]
LANES = 16


def kind(t):
    return "float" if t.is_float else "int"


@st.composite
def expression_kernel(draw, max_ops=14):
    """A kernel reading one input of each type, computing a random DAG, storing one result."""
    params = [Value(f"in_{t}", PtrType(t)) for t in TYPES] + [Value("out", PtrType(f32)),
                                                               Value("outi", PtrType(i32))]
    ops, pool, n = [], {t: [] for t in TYPES + [boolean]}, [0]

    def new(t):
        n[0] += 1
        v = Value(f"v{n[0]}", t)
        pool[t].append(v)
        return v
    gid = Value("gid", i32)
    ops.append(Op("global_id", (), (gid,), (("dim", 0),)))
    for p, t in zip(params, TYPES):
        ops.append(Op("load", (p, gid), (new(t),)))
    for _ in range(draw(st.integers(1, max_ops))):
        t = draw(st.sampled_from(TYPES))
        choice = draw(st.sampled_from(["bin", "bin", "un", "cmp", "select", "cast", "const"]))
        if choice == "bin":
            op = draw(st.sampled_from(BINARY[kind(t)]))
            a, b = draw(st.sampled_from(pool[t])), draw(st.sampled_from(pool[t]))
            ops.append(Op(op, (a, b), (new(t),)))
        elif choice == "un":
            a = draw(st.sampled_from(pool[t]))
            ops.append(Op(draw(st.sampled_from(UNARY[kind(t)])), (a,), (new(t),)))
        elif choice == "cmp":
            a, b = draw(st.sampled_from(pool[t])), draw(st.sampled_from(pool[t]))
            ops.append(Op(draw(st.sampled_from(COMPARE)), (a, b), (new(boolean),)))
        elif choice == "select" and pool[boolean]:
            c = draw(st.sampled_from(pool[boolean]))
            a, b = draw(st.sampled_from(pool[t])), draw(st.sampled_from(pool[t]))
            ops.append(Op("select", (c, a, b), (new(t),)))
        elif choice == "cast":
            src = draw(st.sampled_from(TYPES))
            ops.append(Op("cast", (draw(st.sampled_from(pool[src])),), (new(t),)))
        else:
            if t.is_float:
                bits = float_to_bits(draw(st.floats(width=32)), 32)
                ops.append(Op("const", (), (new(t),), (("bits", bits),)))
            else:
                ops.append(Op("const", (), (new(t),), (("value", draw(st.integers(t.min, t.max))),)))
    res_f = pool[f32][-1]
    res_i = draw(st.sampled_from(pool[i32] + pool[u32]))
    if res_i.type != i32:
        cast_v = Value("ri", i32)
        ops.append(Op("bitcast", (res_i,), (cast_v,)))
        res_i = cast_v
    ops.append(Op("store", (params[3], gid, res_f)))
    ops.append(Op("store", (params[4], gid, res_i)))
    ops.append(Op("return"))
    return Kernel("expr", tuple(params), Block((), tuple(ops)))


@st.composite
def control_kernel(draw):
    """Random kernels with if/for/while regions, for the text round trip."""
    k = draw(expression_kernel(max_ops=6))
    ops = list(k.body.ops[:-3])
    gid = ops[0].results[0]
    c = Value("c0", boolean)
    lo, hi, one = Value("lo", i32), Value("hi", i32), Value("one", i32)
    ops += [Op("lt", (gid, gid), (c,)),
            Op("const", (), (lo,), (("value", 0),)), Op("const", (), (hi,), (("value", 3),)),
            Op("const", (), (one,), (("value", 1),))]
    iv, acc, acc2 = Value("k", i32), Value("acc", i32), Value("acc2", i32)
    body = Block((iv, acc), (Op("safepoint", attrs=(("id", 0),)),
                             Op("add", (acc, iv), (acc2,)), Op("yield", (acc2,))))
    r = Value("r", i32)
    ops.append(Op("for", (lo, hi, one, lo), (r,), regions=(body,)))
    y = Value("y", i32)
    ops.append(Op("if", (c,), (y,), regions=(Block((), (Op("yield", (r,)),)),
                                             Block((), (Op("yield", (lo,)),)))))
    wa, wb, wc, wd = (Value(n, i32) for n in ("wa", "wb", "wc", "wd"))
    cc = Value("cc", boolean)
    ops.append(Op("while", (y,), (wd,), regions=(
        Block((wa,), (Op("lt", (wa, hi), (cc,)), Op("condition", (cc, wa)))),
        Block((wb,), (Op("add", (wb, one), (wc,)), Op("yield", (wc,)))))))
    ops += list(k.body.ops[-3:-2]) + [Op("store", (k.params[4], gid, wd)), Op("return")]
    return Kernel("ctl", k.params, Block((), tuple(ops)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(control_kernel())
def test_random_kernels_round_trip_through_text(k):
    m = verify_module(Module((k,)))
    text = print_module(m)
    assert parse_module(text) == m
    assert print_module(parse_module(text)) == text


def _scalar(t, raw):
    if t.is_float:
        return float_from_bits(int(np.array(raw, np.float32).view(np.uint32)), 32)
    return int(raw)


def _same(t, a, b) -> bool:
    if t.is_float:
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def run_scalar(k: Kernel, inputs, lane):
    env = {}
    for op in k.body.ops:
        if op.name == "global_id":
            env[op.result.name] = lane
        elif op.name == "load":
            p = op.operands[0]
            env[op.result.name] = _scalar(p.type.elem, inputs[p.name][lane])
        elif op.name == "const":
            t = op.result.type
            env[op.result.name] = float_from_bits(op.attr("bits"), 32) if t.is_float else op.attr("value")
        elif op.name == "cast":
            env[op.result.name] = scalar_eval.cast(op.operands[0].type, op.result.type,
                                                   env[op.operands[0].name])
        elif op.name == "bitcast":
            v = env[op.operands[0].name]
            env[op.result.name] = scalar_eval.wrap(i32, v)
        elif op.name in ("store", "return"):
            continue
        else:
            t = op.operands[-1].type
            env[op.result.name] = scalar_eval.evaluate(op.name, t, *(env[v.name] for v in op.operands))
    stores = [op for op in k.body.ops if op.name == "store"]
    return [(s.operands[2].type, env[s.operands[2].name]) for s in stores]


SPECIAL_F = [0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 3e9, -3e9, 1e-45, 2.5, 1e38]
SPECIAL_I = [0, 1, -1, 2**31 - 1, -2**31, 31, 32, 33, 7, -7]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(expression_kernel(), st.integers(0, 2**32 - 1))
def test_interpreter_agrees_with_scalar_evaluator(k, seed):
    verify_module(Module((k,)))
    rng = np.random.default_rng(seed)
    inputs = {
        "in_i32": rng.choice(np.array(SPECIAL_I + list(rng.integers(-2**31, 2**31, 6)), np.int64), LANES).astype(np.int32),
        "in_u32": rng.choice(np.array([0, 1, 2**32 - 1, 2**31, 5, 32] + list(rng.integers(0, 2**32, 4)), np.uint64), LANES).astype(np.uint32),
        "in_f32": rng.choice(np.array(SPECIAL_F + list(rng.standard_normal(4) * 100), np.float32), LANES),
    }
    out, outi = np.zeros(LANES, np.float32), np.zeros(LANES, np.int32)
    Interpreter(k).run([inputs["in_i32"], inputs["in_u32"], inputs["in_f32"], out, outi],
                       (LANES, 1, 1), (LANES, 1, 1))
    for lane in range(LANES):
        (tf, want_f), (_, want_i) = run_scalar(k, inputs, lane)
        assert _same(f32, _scalar(f32, out[lane]), want_f), (lane, out[lane], want_f)
        assert int(outi[lane]) == want_i, (lane, outi[lane], want_i)

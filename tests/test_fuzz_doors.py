"""Fuzzing the front doors: mutated IR text, random @kernel sources (valid and invalid Python
in the kernel subset) and random launch arguments. Every outcome is a result or one line of
ConcordiaError naming where; never another exception type, never a hang.

CONCORDIA_FUZZ_EXAMPLES scales every door (default: 500 IR texts, 300 kernel sources, 300
launches in the suite; the README documents a 10,000-per-door run)."""
import itertools
import os
import signal
import tempfile
import traceback
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from concordia.backends.conformance import all_cases
from concordia import ConcordiaError, Runtime, parse_module, print_module, verify_module
from concordia.cli import _load_module_from
from concordia_ir.ops import Module

SCALE = os.environ.get("CONCORDIA_FUZZ_EXAMPLES")
HANG_S = 20


def examples(default: int) -> int:
    return int(SCALE) if SCALE else default


def fuzz_settings(n):
    return settings(max_examples=examples(n), deadline=None, derandomize=not SCALE,
                    suppress_health_check=list(HealthCheck), database=None)


@contextmanager
def no_hang(what: str):
    def alarm(*_):
        raise AssertionError(f"{what} did not finish in {HANG_S} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: ConcordiaError, located: str | None = None) -> str:
    msg = str(e)
    assert "\n" not in msg.strip(), f"a multi-line error: {msg!r}"
    if located is not None:
        assert msg.startswith(located) and msg[len(located):].split(":")[0].isdigit(), \
            f"no file:line in {msg!r}"
    return msg


# ---- door 1: IR text -------------------------------------------------------------------------

SEEDS = [print_module(Module((c.kernel,))) for c in itertools.islice(all_cases(), 0, None, 6)]
TOKENS = ["%", "@", "(", ")", "{", "}", ":", ",", "=", "i32", "f32", "u64", "ptr<f32>", "add",
          "load", "store", "for", "if", "yield", "0", "-1", "4294967296", "1.5e400", "nan",
          "\"", "kernel", "global_id", "%v1", "^", "dim", "\n", " ", "//", "bool"]


@st.composite
def mutated_ir(draw):
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["delete", "insert", "replace", "dup_line", "drop_line", "swap"]))
        lines = text.split("\n")
        if how == "delete":
            text = text[:pos] + text[pos + draw(st.integers(1, 12)):]
        elif how == "insert":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif how == "replace":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos + draw(st.integers(1, 6)):]
        else:
            k = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            if how == "dup_line":
                lines.insert(j, lines[k])
            elif how == "drop_line":
                del lines[k]
            else:
                lines[k], lines[j] = lines[j], lines[k]
            text = "\n".join(lines)
    return text


@fuzz_settings(500)
@given(mutated_ir())
def test_mutated_ir_text_parses_or_fails_in_one_located_line(text):
    with no_hang("parsing and verifying IR text"):
        try:
            m = verify_module(parse_module(text, "fuzz.cir"))
        except ConcordiaError as e:
            one_line(e, "fuzz.cir:")
            event(f"refused: {type(e).__name__}")
            return
    event("parsed and verified")
    assert parse_module(print_module(m), "again.cir") is not None   # a result round-trips


# ---- door 2: @kernel sources -----------------------------------------------------------------

PARAMS = ["x: Ptr[f32]", "y: Ptr[i32]", "n: i32", "a: f32", "u: u32", "d: f64", "w: Ptr[u64]",
          "q: list", "r", "s: Ptr[str]", "t: i32 = 3", "*rest"]
NAMES = ["i", "n", "a", "u", "d", "v", "acc", "zz", "x", "y", "True", "None"]
BAD_STMTS = ["print(i)", "v = [1, 2]", "del v", "import os", "x.foo = 1", "assert i",
             "v = lambda: 1", "global q", "pass", "v, acc = 1, 2", "with open('f') as fh:\n    pass",
             "try:\n    pass\nexcept Exception:\n    pass", "v += 1", "break", "continue",
             "yield i", "v = x", "x[0] = x", "v = f'{i}'", "v: i32 = 1"]


def expr(depth=2):
    leaf = st.one_of(st.sampled_from(NAMES), st.integers(-2**70, 2**70).map(str),
                     st.floats(allow_nan=False).map(repr), st.sampled_from(['"s"', "1e400", "0x7f"]),
                     st.sampled_from(["x[i]", "y[i]", "x[0]", "y[i + 1]", "x[a]", "global_id(0)",
                                      "local_id(1)", "global_id(3)", "group_id(0)"]))
    if depth == 0:
        return leaf
    sub = expr(depth - 1)
    return st.one_of(
        leaf,
        st.tuples(sub, st.sampled_from("+ - * / // % << >> & | ^ ** @".split()), sub)
          .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from("< <= == != > >= is in".split()), sub)
          .map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["-", "not ", "~"]), sub).map(lambda t: f"({t[0]}{t[1]})"),
        st.tuples(sub, sub, sub).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        st.tuples(sub, st.sampled_from(["and", "or"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["sqrt", "abs", "f32", "i32", "u32", "f64", "floor", "len",
                                   "int", "float", "ceil", "i64"]), sub).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(st.sampled_from(["min", "max", "bitcast", "atomic_add", "pow"]), sub, sub)
          .map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(sub, sub, sub).map(lambda t: f"fma({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(sub, sub, sub).map(lambda t: f"select({t[0]}, {t[1]}, {t[2]})"),
        sub.map(lambda e: f"bitcast({e}, u32)"),
        sub.map(lambda e: f"atomic_add(y, i, {e})"),
    )


def block(depth):
    simple = st.one_of(
        st.tuples(st.sampled_from(["v", "acc", "i", "n"]), expr()).map(lambda t: f"{t[0]} = {t[1]}"),
        st.tuples(st.sampled_from(["x", "y", "w"]), expr(1), expr()).map(lambda t: f"{t[0]}[{t[1]}] = {t[2]}"),
        st.sampled_from(BAD_STMTS + ["return", "barrier()", "safepoint()", "v = local_array(f32, 64)"]),
    )
    if depth == 0:
        return st.lists(simple, min_size=1, max_size=3)
    inner = block(depth - 1)
    compound = st.one_of(
        st.tuples(expr(1), inner, st.none() | inner).map(
            lambda t: [f"if {t[0]}:"] + ind(t[1]) + (["else:"] + ind(t[2]) if t[2] else [])),
        st.tuples(st.sampled_from(["t", "i"]), expr(1), st.booleans(), inner).map(
            lambda t: [f"for {t[0]} in range({t[1]}):"] + ind((["safepoint()"] if t[2] else []) + t[3])),
        st.tuples(expr(1), inner).map(lambda t: [f"while {t[0]}:"] + ind(t[1])),
    )
    return st.lists(st.one_of(simple.map(lambda s: [s]), compound), min_size=1, max_size=4).map(
        lambda bs: [line for b in bs for line in b])


def ind(lines):
    return ["    " + ln for b in lines for ln in b.split("\n")]


def typed(t: str, depth=2):
    """Well-typed expressions of the kernel subset (the front-end should accept them)."""
    if t == "f":
        leaf = st.one_of(st.sampled_from(["a", "x[i]", "acc", "0.5", "1.0e-3", "x[i % n]"]),
                         st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: repr(float(v))))
    else:
        leaf = st.one_of(st.sampled_from(["i", "n", "y[i]", "k", "global_id(0)", "local_id(0)"]),
                         st.integers(-1000, 1000).map(str))
    if depth == 0:
        return leaf
    f, g = typed("f", depth - 1), typed("i", depth - 1)
    same = typed(t, depth - 1)
    ops = "+ - * / min max".split() if t == "f" else "+ - * // % & | ^ << >> min max".split()
    forms = [leaf,
             st.tuples(same, st.sampled_from(ops), same).map(
                 lambda x: f"{x[1]}({x[0]}, {x[2]})" if x[1] in ("min", "max") else f"({x[0]} {x[1]} {x[2]})"),
             st.tuples(g, st.sampled_from(["<", ">=", "=="]), g, same, same).map(
                 lambda x: f"({x[3]} if {x[0]} {x[1]} {x[2]} else {x[4]})")]
    if t == "f":
        forms += [g.map(lambda e: f"f32({e})"), same.map(lambda e: f"sqrt(abs({e}))"),
                  st.tuples(same, same, same).map(lambda x: f"fma({x[0]}, {x[1]}, {x[2]})")]
    else:
        forms += [f.map(lambda e: f"i32({e})"), same.map(lambda e: f"abs({e})")]
    return st.one_of(*forms)


def typed_block(depth):
    simple = st.one_of(typed("f").map(lambda e: f"acc = {e}"), typed("i").map(lambda e: f"k = {e}"),
                       typed("f").map(lambda e: f"x[i] = {e}"), typed("i").map(lambda e: f"y[i] = {e}"),
                       st.just("atomic_add(y, 0, 1)"))
    if depth == 0:
        return st.lists(simple, min_size=1, max_size=3)
    inner = typed_block(depth - 1)
    cond = st.tuples(typed("i", 1), st.sampled_from(["<", ">", "!="]), typed("i", 1)).map(" ".join)
    compound = st.one_of(
        st.tuples(cond, inner, st.none() | inner).map(
            lambda t: [f"if {t[0]}:"] + ind(t[1]) + (["else:"] + ind(t[2]) if t[2] else [])),
        st.tuples(st.integers(0, 5), inner).map(lambda t: [f"for t in range({t[0]}):"] + ind(t[1])),
    )
    return st.lists(st.one_of(simple.map(lambda s: [s]), compound), min_size=1, max_size=4).map(
        lambda bs: [line for b in bs for line in b])


TYPED_BODY, ANY_BODY = typed_block(2), block(2)   # strategies built once, drawn per example


@st.composite
def kernel_source(draw):
    if draw(st.booleans()):                   # well-typed: should compile
        params = ["x: Ptr[f32]", "y: Ptr[i32]", "n: i32", "a: f32"]
        body = ["i = global_id(0)", "acc = 0.0", "k = 0", "if i >= n:", "    return"]
        body += draw(TYPED_BODY)
    else:                                     # anything: valid or not
        params = draw(st.lists(st.sampled_from(PARAMS), min_size=0, max_size=5, unique=True))
        body = (["i = global_id(0)"] if draw(st.booleans()) else []) + draw(ANY_BODY)
    src = ("from concordia import *\n\n\n@kernel\n"
           f"def k({', '.join(params)}):\n" + "\n".join(ind(body)) + "\n")
    if draw(st.integers(0, 9)) == 0:          # sometimes not even Python
        pos = draw(st.integers(0, len(src) - 1))
        src = src[:pos] + draw(st.sampled_from(["(", ":", "    ", "", "\t", "def"])) + src[pos + 1:]
    return src


FUZZ_DIR = tempfile.mkdtemp(prefix="concordia-fuzz-")
COUNTER = itertools.count()


@pytest.mark.filterwarnings("ignore::SyntaxWarning")
@fuzz_settings(300)
@given(kernel_source())
def test_random_kernel_sources_compile_or_fail_in_one_located_line(src):
    path = os.path.join(FUZZ_DIR, f"k{next(COUNTER)}.py")    # a new name: no stale line cache
    with open(path, "w") as fh:
        fh.write(src)
    with no_hang("compiling a kernel source"):
        try:
            m = _load_module_from(path)
        except ConcordiaError as e:
            one_line(e, f"{path}:")
            event(f"refused: {type(e).__name__}")
            return
        finally:
            os.remove(path)
    event("compiled")
    assert m.kernels[0].name == "k"


# ---- door 3: launch arguments ----------------------------------------------------------------

RT = Runtime("reference")
CASES = [c for c in itertools.islice(all_cases(), 0, None, 10)]


def arg_values():
    bufs = [RT.zeros(n, dt) for dt in (np.float32, np.int32, np.uint32, np.float64, np.int64)
            for n in (1, 64, 300)]
    other = Runtime("reference").zeros(64, np.float32)
    freed = RT.zeros(8, np.float32)
    RT.free(freed)
    return st.one_of(st.sampled_from(bufs + [other, freed, None, "x", [1, 2], np.zeros(4),
                                             np.float32(1.5), np.int32(3), np.uint32(7),
                                             np.int64(-1), np.float64(2.0), True, 1.5, 2**40, -3]),
                     st.integers(-2**33, 2**33), st.floats())


ARG_VALUES = arg_values()   # buffers made once, not per drawn argument

geometry = st.one_of(st.integers(-4, 2048), st.sampled_from([0, 1 << 40, None, "64", 1.5, (), [64]]),
                     st.lists(st.integers(-1, 256), min_size=1, max_size=4).map(tuple))


@fuzz_settings(300)
@given(st.sampled_from(CASES), geometry, geometry, st.data())
def test_random_launches_run_or_fail_in_one_line(case, g, l, data):
    if data.draw(st.integers(0, 2)):          # mostly the case's own geometry
        g, l = case.global_size, case.local_size
    use_case_args = data.draw(st.integers(0, 3)) > 0
    if use_case_args:        # the case's own arguments, sometimes one replaced
        args = case.make_args(np.random.default_rng(0))
        args = [RT.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
        if data.draw(st.booleans()) and args:
            args[data.draw(st.integers(0, len(args) - 1))] = data.draw(ARG_VALUES)
    else:
        args = data.draw(st.lists(ARG_VALUES, max_size=len(case.kernel.params) + 1))
    with no_hang("a launch"):
        try:
            RT.launch(case.kernel, global_size=g, local_size=l, args=args)
            event("ran")
        except ConcordiaError as e:
            one_line(e)
            event(f"refused: {type(e).__name__}")
        except Exception:
            pytest.fail(f"launch of {case.name} with global_size={g!r}, local_size={l!r}: "
                        f"not a ConcordiaError:\n{traceback.format_exc()}")

"""Text form: print -> parse round-trips; malformed text and ill-typed IR give file:line errors."""
import pytest

from concordia import IRParseError, IRVerifyError, parse_module, print_module, verify_module
from tests.test_interpreter import atomics_k, divergent_loop, early_exit, group_sum, nested


@pytest.mark.parametrize("k", [group_sum, atomics_k, divergent_loop, early_exit, nested])
def test_round_trip_of_front_end_kernels(k):
    text = print_module(k.module)
    m = parse_module(text)
    assert m == k.module
    assert print_module(m) == text


def test_module_with_several_kernels_and_float_specials():
    text = """
kernel @a(%x: ptr<global f32>) {
  %0 = const [value = 0] : i32
  %n = const [bits = 0x7fc00001] : f32
  %i = const [value = -inf] : f32
  %z = const [value = -0.0] : f32
  %s = add %n, %i : f32
  %t = add %s, %z : f32
  store %x, %0, %t
  return
}

kernel @b(%y: ptr<global i64>, %n: i64) {
  %0 = const [value = 0] : i64
  %1 = const [value = 1] : i64
  %r = for %0, %n, %1, %0 : i64 ^(%k: i64, %acc: i64) {
    safepoint [id = 0]
    %a2 = add %acc, %k : i64
    yield %a2
  }
  store %y, %0, %r
  return
}
"""
    m = verify_module(parse_module(text, "two.cir"))
    assert [k.name for k in m.kernels] == ["a", "b"]
    again = parse_module(print_module(m))
    assert again == m and print_module(again) == print_module(m)
    assert "bits = 0x7fc00001" in print_module(m) and "value = -0.0" in print_module(m)


@pytest.mark.parametrize("text,line,match", [
    ("kernel @k() {\n  %0 = bogus : i32\n  return\n}\n", 2, "unknown op 'bogus'"),
    ("kernel @k() {\n  store %x, %y, %z\n  return\n}\n", 2, "undefined value %x"),
    ("kernel @k(%a: i33) {\n  return\n}\n", 1, "unknown type 'i33'"),
    ("kernel @k() {\n  %0 = const [value = 1] : i32, i32\n  return\n}\n", 2, "1 result(s) but 2"),
    ("kernel @k() {\n  return\n", 3, "expected '}'"),
    ("kernel @k(%p: ptr<shared f32>) {\n  return\n}\n", 1, "unknown address space"),
])
def test_parse_errors_name_the_line(text, line, match):
    with pytest.raises(IRParseError) as info:
        parse_module(text, "bad.cir")
    assert str(info.value).startswith(f"bad.cir:{line}:") and match in str(info.value)


@pytest.mark.parametrize("body,line,match", [
    ("  %0 = const [value = 1] : i32\n  %1 = const [value = 1.0] : f32\n"
     "  %2 = add %0, %1 : i32\n  return\n", 4, "operand types differ"),
    ("  %0 = const [value = 1] : i32\n", 2, "missing return"),
    ("  %0 = global_id [dim = 0] : i32\n  %1 = const [value = 1] : i32\n"
     "  %c = lt %0, %1 : bool\n  if %c {\n    barrier\n    yield\n  } {\n    yield\n  }\n"
     "  return\n", 6, "barrier inside divergent"),
    ("  %0 = const [value = 0] : i32\n  %1 = const [value = 1.0] : f32\n"
     "  store %p, %0, %1\n  return\n", 4, "value of type f32 stored through a ptr<global i32>"),
    ("  %0 = const [value = 0] : i32\n  %l = local_alloc [size = 4] : ptr<local i64>\n"
     "  %1 = const [value = 1] : i64\n  %2 = atomic_add %l, %0, %1 : i64\n  return\n", 5,
     "atomics are defined on i32 and u32"),
    ("  %0 = const [value = 5000000000] : i32\n  return\n", 2, "does not fit in i32"),
    ("  %0 = const [value = 1] : i32\n  %0 = const [value = 2] : i32\n  return\n", 3,
     "defined twice"),
])
def test_verifier_errors_name_line_kernel_and_op(body, line, match):
    text = f"kernel @k(%p: ptr<global i32>) {{\n{body}}}\n"
    with pytest.raises(IRVerifyError) as info:
        verify_module(parse_module(text, "bad.cir"))
    msg = str(info.value)
    assert msg.startswith(f"bad.cir:{line}: kernel 'k'") and match in msg, msg


def test_local_pointer_parameter_is_refused():
    with pytest.raises(IRVerifyError, match="may only point to global memory"):
        verify_module(parse_module("kernel @k(%p: ptr<local f32>) {\n  return\n}\n"))

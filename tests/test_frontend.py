"""@kernel: the supported subset compiles; everything else fails at the user's line."""
import inspect

import numpy as np
import pytest

from concordia import (KernelSyntaxError, IRVerifyError, Ptr, Runtime, barrier, f32, global_id,
                          i32, kernel, local_id, safepoint, u32, ConcordiaError)


def line_of(fragment: str, fn) -> int:
    lines, first = inspect.getsourcelines(fn)
    for k, text in enumerate(lines):
        if fragment in text:
            return first + k
    raise AssertionError(fragment)


def refused(body_fn, fragment, match):
    """Define a kernel inside body_fn; it must fail naming this file and the fragment's line."""
    with pytest.raises((KernelSyntaxError, IRVerifyError)) as info:
        body_fn()
    line = line_of(fragment, body_fn)
    assert f"test_frontend.py:{line}:" in str(info.value), str(info.value)
    assert match in str(info.value), str(info.value)


def test_mixed_types_need_explicit_casts():
    def define():
        @kernel
        def k(x: Ptr[f32], n: i32):
            x[0] = x[0] + n  # MIXED
    refused(define, "# MIXED", "casts are explicit")


def test_unsupported_statement():
    def define():
        @kernel
        def k(x: Ptr[f32]):
            with open("f"):  # WITH
                pass
    refused(define, "# WITH", "With statements are not supported")


def test_break_is_refused_with_advice():
    def define():
        @kernel
        def k(x: Ptr[i32]):
            for j in range(4):
                break  # BREAK
    refused(define, "# BREAK", "'break' is not supported")


def test_int_true_division():
    def define():
        @kernel
        def k(x: Ptr[i32]):
            x[0] = x[1] / 2  # DIV
    refused(define, "# DIV", "use '//'")


def test_missing_annotation():
    def define():
        @kernel
        def k(x):  # NOANN
            pass
    refused(define, "# NOANN", "needs a type annotation")


def test_barrier_in_divergent_if_names_line():
    def define():
        @kernel
        def k(x: Ptr[f32]):
            if local_id(0) < 3:
                barrier()  # BAR
    refused(define, "# BAR", "barrier inside divergent control flow")


def test_variable_type_change():
    def define():
        @kernel
        def k(x: Ptr[f32]):
            v = 1
            v = x[0]  # RETYPE
    refused(define, "# RETYPE", "variable 'v' is i32")


def test_loop_variable_not_available_after_loop():
    def define():
        @kernel
        def k(x: Ptr[i32]):
            for j in range(4):
                x[j] = j
            x[0] = j  # AFTER
    refused(define, "# AFTER", "loop variables are not available after their loop")


def test_unknown_function():
    def define():
        @kernel
        def k(x: Ptr[f32]):
            x[0] = np.sin(x[0])  # NPSIN
    refused(define, "# NPSIN", "cannot be called in a kernel")


def test_safepoint_not_first_in_loop():
    def define():
        @kernel
        def k(x: Ptr[i32]):
            for j in range(4):
                x[j] = j
                safepoint()  # SP
    refused(define, "# SP", "safepoint() must be the first statement")


def test_literal_out_of_range():
    def define():
        @kernel
        def k(x: Ptr[i32]):
            x[0] = 3000000000  # BIG
    refused(define, "# BIG", "does not fit in i32")


def test_calling_a_kernel_directly_is_a_clear_error():
    @kernel
    def k(x: Ptr[f32]):
        x[0] = 1.0
    with pytest.raises(ConcordiaError, match="Runtime.launch"):
        k(None)


def test_uniform_loop_barrier_is_accepted_and_ir_is_readable():
    @kernel
    def k(x: Ptr[f32], n: i32):
        acc = 0.0
        for j in range(n):
            safepoint()
            acc += x[j]
            barrier()
        x[global_id(0)] = acc
    text = k.ir
    assert "safepoint [id = 0]" in text and "barrier" in text
    assert "%acc" in text and "for %" in text


def test_short_circuit_and_protects_loads():
    @kernel
    def k(x: Ptr[i32], out: Ptr[i32], n: i32):
        i = global_id(0)
        if i < n and x[i] > 0:
            out[i] = 1
        out2 = 5 if i < n else -5
        if i < n:
            out[i] += out2
    rt = Runtime("reference")
    x = rt.to_device(np.array([1, -1, 2], np.int32))
    out = rt.zeros(3, np.int32)
    rt.launch(k, global_size=8, local_size=8, args=(x, out, 3))   # lanes 3..7 must not load
    assert out.numpy().tolist() == [6, 5, 6]


def test_constants_from_python_scope_and_unsigned_literals():
    TILE = 4

    @kernel
    def k(out: Ptr[u32]):
        i = global_id(0)
        out[i] = u32(i) * TILE + 0xFFFFFFFF
    rt = Runtime("reference")
    out = rt.zeros(3, np.uint32)
    rt.launch(k, global_size=3, local_size=3, args=(out,))
    assert out.numpy().tolist() == [(i * 4 + 0xFFFFFFFF) % 2**32 for i in range(3)]

"""Concordia IR: a small typed SIMT kernel IR, its Python front-end and its reference oracle."""
from .builtins import (atomic_add, atomic_cas, atomic_max, atomic_min, atomic_xchg, barrier, bitcast,
                       ceil, clz, fence, floor, fma, global_id, global_size, group_id, local_array,
                       local_id, local_size, num_groups, popcount, safepoint, select, sqrt)
from .errors import (BackendUnavailable, CompileError, ConcordiaError, IRParseError, IRVerifyError,
                     KernelRuntimeError, KernelSyntaxError, LaunchError)
from .frontend import KernelFunction, kernel
from .ops import Block, Kernel, Loc, Module, Op, Value
from .parser import parse_file, parse_module
from .printer import print_module
from .types import Ptr, PtrType, ScalarType, f32, f64, i32, i64, u32, u64
from .types import boolean as bool_
from .verifier import verify_module

__version__ = "0.2.0"

__all__ = [
    "kernel", "KernelFunction",
    "i32", "u32", "i64", "u64", "f32", "f64", "bool_", "Ptr", "ScalarType", "PtrType",
    "global_id", "local_id", "group_id", "global_size", "local_size", "num_groups",
    "barrier", "fence", "safepoint", "local_array", "atomic_add", "atomic_min", "atomic_max",
    "atomic_xchg", "atomic_cas", "sqrt", "floor", "ceil", "fma", "select", "bitcast",
    "popcount", "clz",
    "Module", "Kernel", "Op", "Block", "Value", "Loc", "parse_module", "parse_file",
    "print_module", "verify_module",
    "ConcordiaError", "KernelSyntaxError", "IRParseError", "IRVerifyError", "LaunchError",
    "KernelRuntimeError", "BackendUnavailable", "CompileError",
]

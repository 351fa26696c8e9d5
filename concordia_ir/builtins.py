"""Names usable inside @kernel functions. Outside a kernel they only explain themselves."""
from __future__ import annotations

from .errors import ConcordiaError


def _builtin(name: str, doc: str):
    def stub(*args, **kwargs):
        raise ConcordiaError(f"{name}() can only be used inside a @kernel function")
    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = doc
    stub._concordia_builtin = name
    return stub


global_id = _builtin("global_id", "global_id(dim): this work-item's index in the grid (i32).")
local_id = _builtin("local_id", "local_id(dim): index inside the work-group (i32).")
group_id = _builtin("group_id", "group_id(dim): the work-group's index (i32).")
global_size = _builtin("global_size", "global_size(dim): work-items in the grid (i32).")
local_size = _builtin("local_size", "local_size(dim): work-items in a group (i32).")
num_groups = _builtin("num_groups", "num_groups(dim): work-groups in the grid (i32).")
barrier = _builtin("barrier", "barrier(): every work-item of the group waits; local memory is synced.")
fence = _builtin("fence", "fence(): this work-item's earlier memory accesses are seen by every "
                          "observer (other groups, the host) before its later ones.")
safepoint = _builtin("safepoint", "safepoint(): first statement of a loop body; a point "
                                  "where the kernel may be paused and migrated.")
local_array = _builtin("local_array", "local_array(T, n): n elements of work-group local memory.")
atomic_add = _builtin("atomic_add", "atomic_add(ptr, i, v): ptr[i] += v, returns the old value.")
atomic_min = _builtin("atomic_min", "atomic_min(ptr, i, v): ptr[i] = min(ptr[i], v), returns old.")
atomic_max = _builtin("atomic_max", "atomic_max(ptr, i, v): ptr[i] = max(ptr[i], v), returns old.")
atomic_xchg = _builtin("atomic_xchg", "atomic_xchg(ptr, i, v): ptr[i] = v, returns the old value.")
atomic_cas = _builtin("atomic_cas", "atomic_cas(ptr, i, cmp, new): if ptr[i] == cmp: ptr[i] = "
                                    "new; returns the old value.")
sqrt = _builtin("sqrt", "sqrt(x): correctly rounded square root.")
floor = _builtin("floor", "floor(x): round toward -inf.")
ceil = _builtin("ceil", "ceil(x): round toward +inf.")
popcount = _builtin("popcount", "popcount(x): number of set bits of an integer.")
clz = _builtin("clz", "clz(x): leading zero bits of an integer; clz(0) is its width.")
fma = _builtin("fma", "fma(a, b, c): a*b+c with one rounding.")
select = _builtin("select", "select(c, a, b): a where c else b, both evaluated.")
bitcast = _builtin("bitcast", "bitcast(x, T): reinterpret the bits of x as type T.")

__all__ = ["global_id", "local_id", "group_id", "global_size", "local_size", "num_groups",
           "barrier", "fence", "safepoint", "local_array", "atomic_add", "atomic_min", "atomic_max",
           "atomic_xchg", "atomic_cas", "sqrt", "floor", "ceil", "popcount", "clz", "fma", "select", "bitcast"]

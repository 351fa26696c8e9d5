"""What differs between the C-family targets, as data. The renderer (cstyle.py) and the
template (templates/kernel.c.j2) are shared; a new C-like target is a new table here."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Dialect:
    name: str
    file_ext: str
    preamble: tuple[str, ...]
    kernel_prefix: str
    helper_prefix: str
    global_ptr: str
    local_decl: str                       # format: {type} {name} {size}
    types: dict[str, str]                 # IR type -> C type of values
    bool_storage: str                     # C type of bools in memory and parameters
    int64_suffix: str                     # literal suffix of i64 ('L' or 'LL')
    ids: dict[str, tuple[str, str, str]]  # builtin -> expression per dim
    barrier: str
    fence: str                            # system-scope memory fence (host-visible ordering)
    atomics: dict[str, str]               # op -> format of {p} (address), {v}, {cmp}, {scope}
    atomic_scope: dict[str, str] = field(default_factory=dict)  # address space -> {scope}
    float_fn_suffix: str = "f"            # sqrtf vs sqrt for f32
    fp64_preamble: tuple[str, ...] = ()   # added when a kernel uses f64
    # popcount32/64, clz32/64 -> format of {x}; each must give clz(0) = the width
    bit_counts: dict[str, str] = field(default_factory=dict)
    clock: str = ""                       # a u64 ns timestamp expression; "": the target has none
    clock_preamble: tuple[str, ...] = ()  # added when a kernel reads the clock

    def math(self, name: str, type_name: str) -> str:
        return name + (self.float_fn_suffix if type_name == "f32" else "")


_DIMS = ("x", "y", "z")
_CXX_TYPES = {"i32": "int", "u32": "unsigned int", "i64": "long long",
              "u64": "unsigned long long", "f32": "float", "f64": "double", "bool": "bool"}

OPENCL = Dialect(
    name="opencl",
    file_ext="cl",
    preamble=("#pragma OPENCL FP_CONTRACT OFF",),
    fp64_preamble=("#pragma OPENCL EXTENSION cl_khr_fp64 : enable",),
    kernel_prefix="__kernel void",
    helper_prefix="static inline",
    global_ptr="__global ",
    local_decl="__local {type} {name}[{size}];",
    types={"i32": "int", "u32": "uint", "i64": "long", "u64": "ulong", "f32": "float",
           "f64": "double", "bool": "bool"},
    bool_storage="uchar",
    int64_suffix="L",
    ids={k: tuple(f"(int){fn}({d})" for d in range(3)) for k, fn in (
        ("global_id", "get_global_id"), ("local_id", "get_local_id"), ("group_id", "get_group_id"),
        ("global_size", "get_global_size"), ("local_size", "get_local_size"),
        ("num_groups", "get_num_groups"))},
    barrier="barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);",
    fence="mem_fence(CLK_GLOBAL_MEM_FENCE);",
    atomics={"atomic_add": "atomic_add({p}, {v})", "atomic_min": "atomic_min({p}, {v})",
             "atomic_max": "atomic_max({p}, {v})", "atomic_xchg": "atomic_xchg({p}, {v})",
             "atomic_cas": "atomic_cmpxchg({p}, {cmp}, {v})"},
    float_fn_suffix="",
    bit_counts={"popcount32": "popcount({x})", "popcount64": "popcount({x})",
                "clz32": "clz({x})", "clz64": "clz({x})"},
)

CUDA = Dialect(
    name="cuda",
    file_ext="cu",
    preamble=(),
    kernel_prefix='extern "C" __global__ void',
    helper_prefix="static __device__ __forceinline__",
    global_ptr="",
    local_decl="__shared__ {type} {name}[{size}];",
    types=_CXX_TYPES,
    bool_storage="unsigned char",
    int64_suffix="LL",
    ids={"global_id": tuple(f"(int)(blockIdx.{d} * blockDim.{d} + threadIdx.{d})" for d in _DIMS),
         "local_id": tuple(f"(int)threadIdx.{d}" for d in _DIMS),
         "group_id": tuple(f"(int)blockIdx.{d}" for d in _DIMS),
         "global_size": tuple(f"(int)(gridDim.{d} * blockDim.{d})" for d in _DIMS),
         "local_size": tuple(f"(int)blockDim.{d}" for d in _DIMS),
         "num_groups": tuple(f"(int)gridDim.{d}" for d in _DIMS)},
    barrier="__syncthreads();",
    fence="__threadfence_system();",
    clock="cc_clock()",
    clock_preamble=("static __device__ __forceinline__ unsigned long long cc_clock() "
                    '{ unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); '
                    "return t; }",),
    atomics={"atomic_add": "atomicAdd({p}, {v})", "atomic_min": "atomicMin({p}, {v})",
             "atomic_max": "atomicMax({p}, {v})", "atomic_xchg": "atomicExch({p}, {v})",
             "atomic_cas": "atomicCAS({p}, {cmp}, {v})"},
    # CUDA's __clz(0) is 32 and __clzll(0) 64; HIP's headers define the same four (and the
    # header-less HIP preamble below spells them with clang builtins)
    bit_counts={"popcount32": "__popc((unsigned int)({x}))",
                "popcount64": "__popcll((unsigned long long)({x}))",
                "clz32": "__clz((int)({x}))", "clz64": "__clzll((long long)({x}))"},
)

# HIP as clang compiles it for AMDGPU: the hardware builtins, so that the source needs no
# ROCm headers (-nogpuinc). With ROCm's headers present they are included instead.
HIP = replace(
    CUDA,   # the same C++ shape; what differs is below
    name="hip",
    clock="", clock_preamble=(),   # no device timestamp spelled for AMD yet
    file_ext="hip",
    preamble=(
        "#if defined(__CUDACC_RTC__)",
        "/* compiled as CUDA through hip_on_cuda.h (validation on NVIDIA) */",
        "#elif __has_include(<hip/hip_runtime.h>)",
        "#include <hip/hip_runtime.h>",
        "#else",
        "#define __global__ __attribute__((global))",
        "#define __device__ __attribute__((device))",
        "#define __shared__ __attribute__((shared))",
        '__device__ inline void __threadfence_system() { __builtin_amdgcn_fence(__ATOMIC_SEQ_CST, ""); }',
        *(f"__device__ inline {t} {fn}{s}({', '.join([t + ' x', t + ' y', t + ' z'][:n])}) "
          f"{{ return __builtin_{fn}{s}({', '.join('xyz'[:n])}); }}"
          for t, s in (("float", "f"), ("double", ""))
          for fn, n in (("sqrt", 1), ("floor", 1), ("ceil", 1), ("fabs", 1), ("fmod", 2),
                        ("fma", 3))),
        "__device__ inline int __popc(unsigned int x) { return __builtin_popcount(x); }",
        "__device__ inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }",
        "__device__ inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned int)x); }",
        "__device__ inline int __clzll(long long x) "
        "{ return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }",
        "#endif",
        "#pragma clang fp contract(off)",
    ),
    helper_prefix="static __device__ inline",
    ids={"local_id": tuple(f"(int)__builtin_amdgcn_workitem_id_{d}()" for d in _DIMS),
         "group_id": tuple(f"(int)__builtin_amdgcn_workgroup_id_{d}()" for d in _DIMS),
         "local_size": tuple(f"(int)__builtin_amdgcn_workgroup_size_{d}()" for d in _DIMS),
         "global_size": tuple(f"(int)__builtin_amdgcn_grid_size_{d}()" for d in _DIMS),
         "num_groups": tuple(f"(int)(__builtin_amdgcn_grid_size_{d}() / "
                             f"__builtin_amdgcn_workgroup_size_{d}())" for d in _DIMS),
         "global_id": tuple(f"(int)(__builtin_amdgcn_workgroup_id_{d}() * "
                            f"__builtin_amdgcn_workgroup_size_{d}() + "
                            f"__builtin_amdgcn_workitem_id_{d}())" for d in _DIMS)},
    barrier=('__builtin_amdgcn_fence(__ATOMIC_RELEASE, "workgroup"); '
             '__builtin_amdgcn_s_barrier(); __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "workgroup");'),
    fence="__threadfence_system();",
    atomics={"atomic_add": "__hip_atomic_fetch_add({p}, {v}, __ATOMIC_RELAXED, {scope})",
             "atomic_min": "__hip_atomic_fetch_min({p}, {v}, __ATOMIC_RELAXED, {scope})",
             "atomic_max": "__hip_atomic_fetch_max({p}, {v}, __ATOMIC_RELAXED, {scope})",
             "atomic_xchg": "__hip_atomic_exchange({p}, {v}, __ATOMIC_RELAXED, {scope})",
             "atomic_cas": "cc_cas_{t}({p}, {cmp}, {v})"},
    atomic_scope={"global": "__HIP_MEMORY_SCOPE_AGENT", "local": "__HIP_MEMORY_SCOPE_WORKGROUP"},
)

DIALECTS = {d.name: d for d in (OPENCL, CUDA, HIP)}

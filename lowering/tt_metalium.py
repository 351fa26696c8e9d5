"""IR -> TT-Metalium C++: the scalar tier of the Tenstorrent lowering.

What 32x32 tiles cannot express (gathers, data-dependent loops, bitwise ops, 64-bit types)
runs as plain C++ on a core's RISC-V processors: `kernel_main` walks its groups, and the
work-items of a group as loops. Kernels with barriers or local memory are split at every
barrier (the verifier keeps barriers in group-uniform control flow): each barrier-free stretch
becomes one loop over the group's lanes, values that cross a split live in per-lane arrays,
and the uniform control around barriers runs once per group. The expressions, helpers and
semantics are those of the C-family renderer (cstyle.py); this file only changes where values
live and how work-items are scheduled.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from concordia_ir.ops import Block, Kernel, Op, Value, walk
from concordia_ir.types import PtrType, boolean

from .compile import CompileError
from .cstyle import _UNSIGNED, CStyleRenderer
from .dialects import CUDA, Dialect

INCLUDE = Path(__file__).parent / "include"


class _MetaliumDialect(Dialect):
    def math(self, name: str, type_name: str) -> str:
        return "cc_" + super().math(name, type_name)   # concordia_tt.h: builtins, no libm header


# C++ with the CUDA dialect's types and literals; ids, memory access and atomics differ.
METALIUM = _MetaliumDialect(**{**CUDA.__dict__, **dict(
    name="tt-metalium",
    file_ext="cpp",
    clock="", clock_preamble=(),
    preamble=(),
    kernel_prefix="void",
    helper_prefix="static inline",
    global_ptr="",
    local_decl="static {type} {name}[{size}];",
    ids={"global_id": tuple(f"cc_global_id({d})" for d in range(3)),
         "local_id": tuple(f"cc_local_id({d})" for d in range(3)),
         "group_id": tuple(f"cc_grp[{d}]" for d in range(3)),
         "global_size": tuple(f"cc_gsz[{d}]" for d in range(3)),
         "local_size": tuple(f"cc_lsz[{d}]" for d in range(3)),
         "num_groups": tuple(f"cc_ngr[{d}]" for d in range(3))},
    barrier="/* barrier: the group's lane loop ends here */",
    fence='__asm__ __volatile__("" ::: "memory");',   # one core, in order: a compiler fence
    atomics={},
    # a RISC-V core (and the host build) through GCC/clang builtins, which leave clz(0) undefined
    bit_counts={"popcount32": "__builtin_popcount((unsigned int)({x}))",
                "popcount64": "__builtin_popcountll((unsigned long long)({x}))",
                "clz32": "(({x}) == 0 ? 32 : __builtin_clz((unsigned int)({x})))",
                "clz64": "(({x}) == 0 ? 64 : __builtin_clzll((unsigned long long)({x})))"},
)})

LAUNCH_WORDS = 8   # runtime args before the kernel's own: sizes, first group, group count


def _has_barrier(op: Op) -> bool:
    return any(o.name == "barrier" for r in op.regions for o in walk(r))


class MetaliumRenderer(CStyleRenderer):
    def __init__(self):
        super().__init__(METALIUM)

    def render(self, kernel: Kernel) -> str:
        self.reset(kernel)
        self.grouped = any(op.name in ("barrier", "local_alloc") for op in kernel.walk())
        self.lane_values: set[str] = set()
        lane = []
        if self.grouped:
            for op in kernel.walk():
                lane += [r for r in op.results if not isinstance(r.type, PtrType)]
                lane += [a for region in op.regions for a in region.args]
        self.lane_values = {v.name for v in lane}
        self.lane_decls = [f"{self.ctype(v.type)} {self.cname(v)[:-6]}[CC_MAX_LANES];"
                           for v in lane]
        self.labels = 0
        self.next_label = None
        params = self.runtime_params(kernel)
        if self.grouped:
            self.group_block(kernel.body, 1, on_end=None)
        else:
            self.lane_loop(1, lambda ind: self.block(kernel.body, ind, on_end=None))
        return self.finish(kernel, "metalium.cpp.j2", params=params, lane_arrays=self.lane_decls)

    def runtime_params(self, kernel: Kernel) -> list[str]:
        out, word = [], LAUNCH_WORDS
        for p in kernel.params:
            if isinstance(p.type, PtrType):
                self.spaces[p.name] = "global"
                out.append(f"const cc_global<{self.storage(p.type.elem)}> {self.cname(p)} = "
                           f"cc_arg_buffer<{self.storage(p.type.elem)}>({word});")
                word += 3
            elif p.type == boolean:
                out.append(f"const bool {self.cname(p)} = "
                           f"cc_arg_scalar<unsigned char>({word}) != 0;")
                word += 1
            else:
                out.append(f"const {self.ctype(p.type)} {self.cname(p)} = "
                           f"cc_arg_scalar<{self.ctype(p.type)}>({word});")
                word += 2 if p.type.bits == 64 else 1
        return out

    # -- where values live
    def cname(self, v: Value) -> str:
        name = super().cname(v)
        return f"{name}[cc_l]" if v.name in getattr(self, "lane_values", ()) else name

    def declare(self, v: Value, init: str | None = None, const: bool = False) -> str:
        if v.name not in self.lane_values:
            return super().declare(v, init, const)
        name = self.cname(v)
        return f"{name} = {init};" if init is not None else ";"

    def return_stmt(self) -> str:
        return f"{{ cc_alive[cc_l] = 0; goto {self.next_label}; }}"

    # -- scheduling: lanes as loops
    def lane_loop(self, indent: int, body):
        label, self.labels = f"cc_lane_done_{self.labels}", self.labels + 1
        outer, self.next_label = self.next_label, label
        self.emit(indent, "for (cc_l = 0; cc_l < cc_lanes; ++cc_l) {")
        self.emit(indent + 1, "if (!cc_alive[cc_l]) continue;")
        self.emit(indent + 1, "{")
        body(indent + 2)
        self.emit(indent + 1, "}")
        self.emit(indent + 1, f"{label}:;")
        self.emit(indent, "}")
        self.next_label = outer

    def lanes_assign(self, indent, targets, values, types, op):
        self.lane_loop(indent, lambda ind: self.assign_all(targets, values, types, ind, op))

    def uniform(self, indent: int, value: str) -> str:
        """Read a group-uniform value (a loop bound, a branch condition) from a running lane."""
        self.emit(indent, "cc_l = cc_uniform_lane();")
        self.emit(indent, "if (cc_l < 0) break;" if self.in_loop else "if (cc_l < 0) cc_l = 0;")
        return value

    def group_block(self, b: Block, indent: int, on_end, in_loop: bool = False):
        """A block in group-uniform control: barrier-free runs of ops become lane loops."""
        run: list[Op] = []

        def flush():
            if run:
                ops = list(run)
                self.lane_loop(indent, lambda ind: self.block(Block((), tuple(ops)), ind, None))
                run.clear()
        for op in b.ops:
            if op.name in ("yield", "condition"):
                flush()
                on_end([self.cname(v) for v in op.operands], indent, op)
                return
            if op.name == "local_alloc":
                flush()
                self.op_local_alloc(op, indent)
            elif op.name == "barrier":
                flush()
                self.emit(indent, self.d.barrier, op)
            elif _has_barrier(op):
                flush()
                self.in_loop = in_loop
                getattr(self, "group_" + op.name)(op, indent)
            else:
                run.append(op)
                if op.name == "return":
                    break
        flush()

    def group_if(self, op: Op, indent: int):
        results = [self.cname(r) for r in op.results]
        for r in op.results:
            self.declare(r)
        types = [r.type for r in op.results]

        def end(values, ind, term):
            self.lanes_assign(ind, results, values, types, term)
        self.emit(indent, "{", op)
        cond = self.uniform(indent + 1, self.cname(op.operands[0]))
        self.emit(indent + 1, f"if ({cond}) {{")
        self.group_block(op.regions[0], indent + 2, end, self.in_loop)
        self.emit(indent + 1, "} else {")
        self.group_block(op.regions[1], indent + 2, end, self.in_loop)
        self.emit(indent + 1, "}")
        self.emit(indent, "}")

    def group_for(self, op: Op, indent: int):
        lo, hi, step = (self.cname(v) for v in op.operands[:3])
        body = op.regions[0]
        iv, args = body.args[0], body.args[1:]
        carried = [self.cname(a) for a in args]
        types = [a.type for a in args]
        i = self.cname(iv)
        t, ut = self.ctype(iv.type), self.ctype(_UNSIGNED[iv.type.name])

        def init(ind):
            self.emit(ind, self.declare(iv, lo), op)
            for a, v in zip(args, op.operands[3:]):
                self.emit(ind, self.declare(a, self.cname(v)), op)
        self.lane_loop(indent, init)
        self.emit(indent, "for (;;) {", op)
        self.in_loop = True
        self.uniform(indent + 1, i)
        self.emit(indent + 1, f"if (!({step} > 0 ? {i} < {hi} : ({step} < 0 && {i} > {hi}))) break;")

        def end(values, ind, term):
            self.lanes_assign(ind, carried, values, types, term)
        self.group_block(body, indent + 1, end, in_loop=True)
        self.lane_loop(indent + 1,
                       lambda ind: self.emit(ind, f"{i} = ({t})(({ut}){i} + ({ut}){step});"))
        self.emit(indent, "}")
        self.lanes_assign(indent, [self.cname(r) for r in op.results], carried, types, op)
        for r in op.results:
            self.declare(r)

    def group_while(self, op: Op, indent: int):
        before, after = op.regions
        carried = [self.cname(a) for a in before.args]
        results = [self.cname(r) for r in op.results]
        for r in op.results:
            self.declare(r)
        self.lanes_assign(indent, carried, [self.cname(v) for v in op.operands],
                          [a.type for a in before.args], op)
        self.emit(indent, "for (;;) {", op)

        def on_condition(values, ind, term):
            cond, fwd = values[0], values[1:]
            self.lanes_assign(ind, results, fwd, [r.type for r in op.results], term)
            self.lanes_assign(ind, [self.cname(a) for a in after.args], fwd,
                              [a.type for a in after.args], term)
            for a in after.args:
                self.declare(a)
            self.in_loop = True
            self.emit(ind, f"if (!({self.uniform(ind, cond)})) break;")
            self.group_block(after, ind, on_yield, in_loop=True)

        def on_yield(values, ind, term):
            self.lanes_assign(ind, carried, values, [a.type for a in before.args], term)
        self.group_block(before, indent + 1, on_condition, in_loop=True)
        self.emit(indent, "}")

    # -- memory
    def expr(self, op: Op) -> str:
        if op.name == "load" and op.attr("volatile"):
            op = replace(op, attrs=tuple(a for a in op.attrs if a[0] != "volatile"))
        return super().expr(op)   # every global read is a fresh NoC transfer

    def atomic(self, op: Op, ins: list[str]) -> str:
        return f"cc_{op.name}({', '.join(ins)})"


@lru_cache(maxsize=256)
def _render_cached(kernel: Kernel) -> str:
    return MetaliumRenderer().render(kernel)


def render_metalium(kernel: Kernel) -> str:
    """TT-Metalium C++ source of one IR kernel (a data-movement/compute `kernel_main`)."""
    return _render_cached(kernel)


# ---- builds -------------------------------------------------------------------------------------

HOST_OPTIONS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math",
                "-fwrapv", "-w")
RISCV_OPTIONS = ("--target=riscv32-unknown-elf", "-march=rv32im", "-mabi=ilp32", "-std=c++17",
                 "-O2", "-ffreestanding", "-fno-exceptions", "-fno-rtti", "-ffp-contract=off",
                 "-fwrapv", "-c", "-w")
RISCV_CLANG_CANDIDATES = ("clang++-21", "clang++-20", "clang++-19", "clang++-18", "clang++")

HOST_ENTRY = """
extern "C" void cc_run(const uint32_t* words, uint32_t n, uint32_t* fault) {
    for (uint32_t i = 0; i < n && i < sizeof(cc_shim_args) / 4; ++i) cc_shim_args[i] = words[i];
    for (int i = 0; i < 4; ++i) cc_fault[i] = 0;
    kernel_main();
    for (int i = 0; i < 4; ++i) fault[i] = cc_fault[i];
}
"""


def host_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def riscv_compiler() -> str | None:
    for c in RISCV_CLANG_CANDIDATES:
        path = shutil.which(c)
        if path:
            return path
    return None


def _run_compiler(cmd: list[str], source: str, out_name: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="concordia-tt-") as tmp:
        src = Path(tmp) / "kernel.cpp"
        src.write_text(source)
        out = Path(tmp) / out_name
        proc = subprocess.run([*cmd, str(src), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"{cmd[0]} failed on the TT-Metalium kernel:\n{proc.stderr[-4000:]}")
        return out.read_bytes()


def compile_host(source: str) -> bytes:
    """Generated kernel + host shim -> a shared library with `cc_run(words, n)` (validation)."""
    cxx = host_compiler()
    if cxx is None:
        raise CompileError("no C++ compiler (g++) for the tenstorrent-scalar-host run")
    return _run_compiler([cxx, *HOST_OPTIONS, f"-I{INCLUDE / 'tt_host'}", f"-I{INCLUDE / 'tt'}"],
                         source + HOST_ENTRY, "kernel.so")


def compile_riscv(source: str) -> bytes:
    """Generated kernel -> an rv32im object file (the baby cores' ISA class): proves it builds."""
    clang = riscv_compiler()
    if clang is None:
        raise CompileError("no clang for the RISC-V build (apt install clang-19)")
    return _run_compiler([clang, *RISCV_OPTIONS, f"-I{INCLUDE / 'tt_host'}",
                          f"-I{INCLUDE / 'tt'}"], source, "kernel.o")


def toolchain_id(path: str | None) -> str:
    if path is None:
        return "none"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return hashlib.sha256(out.encode()).hexdigest()[:12]

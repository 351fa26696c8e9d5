"""How the persistent dispatcher's handler loop issues its memory operations, from its SASS.

A large task runs several virtual groups of its handler one after another in one resident
group (docs/persistent.md). Each virtual group's load is a round trip to memory; whether the
next one's load is issued before this one's store decides whether a record's handler costs one
memory latency or one per virtual group. This renders the dispatcher of one handler (scale,
page_copy or bump, as `concordia bench dispatch` runs them) for CUDA, compiles it with NVRTC
(no GPU needed) and reads its SASS with cuobjdump (`--cuobjdump PATH`, else on PATH; the
nvidia-cuda-cuobjdump wheel has one). `--restrict` also shows what `__restrict__` on the
handler's buffers would give (ptxas then reads through the non-coherent path; see the docs for
why a persistent kernel may not), and `--defer U` what deferring U virtual groups' stores gives
(handlers/deferred_stores.py).

    python3 bench/dispatch_sass.py --op scale --cuobjdump /path/to/cuobjdump
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import environment, write_result  # noqa: E402
from bench.dispatch import bump, page_copy, scale  # noqa: E402
from concordia import Runtime  # noqa: E402
from concordia.handlers.deferred_stores import DEFAULT_DEFER, MAX_DEFER  # noqa: E402
from concordia.handlers.dispatcher import build_dispatcher, make_handler  # noqa: E402
from lowering import render_source  # noqa: E402
from lowering.compile import compile_cuda, nvrtc_version  # noqa: E402

OPS = {"scale": (scale, np.float32, 2), "page_copy": (page_copy, np.uint32, 2),
       "bump": (bump, np.int32, 1)}
# plain loads and stores: the handler's and the completion mark (the ring's and claim's polls
# are .STRONG)
MEMORY = re.compile(r"\b(LDG\.E(?:\.CONSTANT)?|STG\.E)\b(?!\.STRONG)")


def dispatcher_source(op: str, defer: int = 1) -> str:
    fn, dtype, buffers = OPS[op]
    rt = Runtime("reference")
    handler = make_handler(op, fn, [rt.zeros(1 << 18, dtype) for _ in range(buffers)])
    return render_source(build_dispatcher([handler], 1024, defer=defer), "cuda")


def with_restrict(source: str) -> str:
    """The handler's pointer parameters (h0.*) marked __restrict__."""
    head, _, rest = source.partition("persistent_dispatch(")
    params, _, body = rest.partition(")")
    params = re.sub(r"(\w+)\* (h0_\w+)", r"\1* __restrict__ \2", params)
    return f"{head}persistent_dispatch({params}){body}"


def sass_of(source: str, cuobjdump: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "dispatch.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compile_cuda(source, "sm_90"))
        return subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout


def memory_order(sass: str) -> list[str]:
    return [m.group(1) for line in sass.splitlines() if (m := MEMORY.search(line))]


INSTRUCTION = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def _registers(operand: str) -> set[int]:
    """The registers an operand names (R6.64: R6 and R7)."""
    out = set()
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", operand):
        out |= {int(m.group(1)), int(m.group(1)) + 1} if m.group(2) else {int(m.group(1))}
    return out


def loads_before_use(sass: str) -> int:
    """The most plain loads issued, in SASS order, before an instruction reads one's result:
    the loads a warp really has in flight when it stops to wait (a load's consumer between
    two loads holds the second back as surely as a store does)."""
    best = count = 0
    pending: set[int] = set()
    for line in sass.splitlines():
        m = INSTRUCTION.search(line)
        if not m:
            continue
        opcode, operands = m.group(1), [o.strip() for o in m.group(2).split(",")]
        plain_load = MEMORY.search(line) and opcode.startswith("LDG")
        writes = not opcode.startswith(("ST", "BRA", "EXIT", "BAR", "MEMBAR", "RED"))
        reads = set().union(*(_registers(o) for o in operands[1 if writes else 0:]))
        if reads & pending:
            best, count = max(best, count), 0
            pending.clear()
        if plain_load:
            count += 1
            pending |= _registers(operands[0])
    return max(best, count)


def longest_load_run(order: list[str]) -> int:
    """The most loads issued back to back before a store: the virtual groups in flight."""
    best = run = 0
    for ins in order:
        run = run + 1 if ins.startswith("LDG") else 0
        best = max(best, run)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=sorted(OPS), default="scale")
    p.add_argument("--cuobjdump", default=shutil.which("cuobjdump"))
    p.add_argument("--restrict", action="store_true",
                   help="also with __restrict__ on the handler's buffers")
    p.add_argument("--defer", type=int, default=DEFAULT_DEFER, metavar="U",
                   help="also with U virtual groups' stores deferred (handlers/deferred_stores.py; "
                        "1: not)")
    p.add_argument("--json", default=None, help="result file (default "
                   "bench/results/dispatch-sass-<op>.json)")
    a = p.parse_args(argv)
    if not 1 <= a.defer <= MAX_DEFER:
        p.error(f"--defer must be 1 to {MAX_DEFER}, got {a.defer}")
    if not a.cuobjdump or not os.access(a.cuobjdump, os.X_OK):
        print("error: no cuobjdump: pass --cuobjdump PATH (pip download nvidia-cuda-cuobjdump)",
              file=sys.stderr)
        return 1
    source = dispatcher_source(a.op)
    variants = [("stores in place (U=1)", source)] + [("__restrict__", with_restrict(source))] * a.restrict \
        + [(f"stores deferred by {a.defer}", dispatcher_source(a.op, a.defer))] * (a.defer > 1)
    rows = []
    for name, src in variants:
        sass = sass_of(src, a.cuobjdump)
        order = memory_order(sass)
        rows.append({"variant": name, "order": " ".join(order),
                     "loads_before_a_store": longest_load_run(order),
                     "loads_before_a_use": loads_before_use(sass)})
        print(f"{a.op}, {name}: {len(order)} plain loads (L) and stores (S), the handler's and "
              f"the completion mark's; at most {longest_load_run(order)} load(s) issued before "
              f"a store, {loads_before_use(sass)} before an instruction waits for one")
        print("  " + " ".join("L" + "c" * ("CONSTANT" in i) if i.startswith("LDG") else "S"
                              for i in order))
    write_result(f"dispatch-sass-{a.op}", {"env": environment("none (NVRTC sm_90, cuobjdump)"),
                                           "nvrtc": nvrtc_version(), "op": a.op, "rows": rows},
                 a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

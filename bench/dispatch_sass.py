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
from concordia.handlers.deferred_stores import MAX_DEFER  # noqa: E402
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


def memory_order(source: str, cuobjdump: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "dispatch.cubin")
        with open(cubin, "wb") as fh:
            fh.write(compile_cuda(source, "sm_90"))
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout
    return [m.group(1) for line in sass.splitlines() if (m := MEMORY.search(line))]


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
    p.add_argument("--defer", type=int, default=4, metavar="U",
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
    variants = [("as built", source)] + [("__restrict__", with_restrict(source))] * a.restrict \
        + [(f"stores deferred by {a.defer}", dispatcher_source(a.op, a.defer))] * (a.defer > 1)
    rows = []
    for name, src in variants:
        order = memory_order(src, a.cuobjdump)
        rows.append({"variant": name, "order": " ".join(order),
                     "loads_in_flight": longest_load_run(order)})
        print(f"{a.op}, {name}: {len(order)} plain loads (L) and stores (S), the handler's and "
              f"the completion mark's; at most "
              f"{longest_load_run(order)} load(s) in flight before a store")
        print("  " + " ".join("L" + "c" * ("CONSTANT" in i) if i.startswith("LDG") else "S"
                              for i in order))
    write_result(f"dispatch-sass-{a.op}", {"env": environment("none (NVRTC sm_90, cuobjdump)"),
                                           "nvrtc": nvrtc_version(), "op": a.op, "rows": rows},
                 a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

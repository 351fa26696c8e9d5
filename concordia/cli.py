"""The `concordia` command. User mistakes end in one line on stderr and exit 1."""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import traceback

from concordia_ir.errors import ConcordiaError
from concordia.lowering.target import STAGE_NAMES, STAGES, Target, compile_program, stage_text


def _is_ours(filename: str) -> bool:
    """Is this file part of Concordia (any floor), wherever it is installed?"""
    import concordia_ir
    from concordia import backends, handlers, lowering
    here = os.path.abspath(filename)
    homes = {os.path.dirname(os.path.abspath(m.__file__))
             for m in (concordia_ir, backends, handlers, lowering)}
    homes.add(os.path.dirname(os.path.abspath(__file__)))
    return any(os.path.commonpath([here, h]) == h for h in homes)


def _user_line(e: BaseException, path: str) -> int:
    frames = traceback.extract_tb(e.__traceback__)
    return next((f.lineno for f in reversed(frames) if f.filename == path), 1)


def _load_module_from(path: str):
    """IR module from a .py file of @kernel functions or from IR text."""
    from concordia_ir.frontend import KernelFunction
    from concordia_ir.ops import Module
    from concordia_ir.parser import parse_file
    from concordia_ir.verifier import verify_module
    if not os.path.exists(path):
        raise ConcordiaError(f"{path}: no such file")
    if not path.endswith(".py"):
        return verify_module(parse_file(path))
    try:
        scope = runpy.run_path(path, run_name="__concordia_load__")
    except SyntaxError as e:
        raise ConcordiaError(f"{e.filename}:{e.lineno}: Python syntax error: {e.msg}") from None
    except ConcordiaError as e:   # located already, or at the user's line that raised it
        if str(e).startswith(f"{path}:"):
            raise
        raise type(e)(f"{path}:{_user_line(e, path)}: {e}") from None
    except Exception as e:  # the user's module failed to import: name its line
        if _is_ours(traceback.extract_tb(e.__traceback__)[-1].filename):
            raise             # raised inside Concordia, not by the user's code: a bug of ours
        text = " ".join(str(e).split())
        raise ConcordiaError(f"{path}:{_user_line(e, path)}: importing it failed: "
                             f"{type(e).__name__}: {text}") from None
    kernels = [v.kernel for v in scope.values() if isinstance(v, KernelFunction)]
    if not kernels:
        raise ConcordiaError(f"{path}:1: no @kernel functions found (decorate each kernel "
                             f"with @kernel, from concordia import kernel)")
    return verify_module(Module(tuple(kernels)))


def cmd_ir_check(args) -> int:
    m = _load_module_from(args.file)
    print(f"{args.file}: ok ({len(m.kernels)} kernel{'s' if len(m.kernels) != 1 else ''}: "
          f"{', '.join(k.name for k in m.kernels)})")
    return 0


def cmd_ir_print(args) -> int:
    from concordia_ir.printer import print_module
    sys.stdout.write(print_module(_load_module_from(args.file)))
    return 0


def cmd_backends(args) -> int:
    from concordia.backends import backend_status
    status = backend_status()
    if args.json:
        print(json.dumps({n: {"available": s.ok, "reason": s.reason, "devices": list(s.devices),
                              "versions": s.versions} for n, s in status.items()}, indent=2))
        return 0
    for name, s in status.items():
        mark = "yes" if s.ok else "no "
        detail = ", ".join(s.devices) if s.ok else s.reason
        vers = " ".join(f"{k}={v}" for k, v in s.versions.items())
        print(f"{name:<22} {mark}  {detail}" + (f"  [{vers}]" if vers and s.ok else ""))
    return 0


def cmd_conformance(args) -> int:
    from concordia.backends import BACKENDS, backend_status
    from concordia.backends.conformance import all_cases, run_suite
    status = backend_status()
    names = args.backend or [n for n, st in status.items() if st.ok]
    for n in names:
        if n not in BACKENDS:
            raise ConcordiaError(f"unknown backend {n!r}; known: {', '.join(BACKENDS)}")
        if not status[n].ok:
            raise ConcordiaError(f"backend {n!r} is not available: {status[n].reason}")
    cases = [c for c in all_cases() if not args.k or args.k in c.name]
    if not cases:
        raise ConcordiaError(f"no conformance case matches -k {args.k!r}")

    def progress(backend, done, total, status_):
        if sys.stderr.isatty():
            print(f"\r{backend}: {done}/{total}", end="", file=sys.stderr, flush=True)
    report = run_suite(names, cases, progress)
    failed = 0
    for n, rep in report.items():
        if sys.stderr.isatty():
            print("\r", end="", file=sys.stderr)
        print(f"{n:<14} passed {rep['passed']:>4}  failed {rep['failed']:>4}  skipped {rep['skipped']:>4}")
        for row in rep["cases"]:
            if row["status"] == "failed":
                print(f"  FAIL {row['case']}: {row['detail']}")
        _print_tiers(rep["cases"])
        failed += rep["failed"]
    if args.json:
        import datetime
        with open(args.json, "w") as fh:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "cases": len(cases), "backends": report}, fh, indent=2, default=str)
    return 1 if failed else 0


def _print_tiers(rows: list[dict]) -> None:
    """For a backend with tiers (tenstorrent): which tier ran each case, and why not tiles."""
    tiered = [r for r in rows if r.get("tier")]
    if not tiered:
        return
    tile = [r for r in tiered if r["tier"] == "tile"]
    secs = sorted(r["seconds"] for r in tile)
    median = f", median {secs[len(secs) // 2] * 1000:.0f} ms per case" if secs else ""
    print(f"  tile tier: {len(tile)} of {len(tiered)} cases{median}")
    print(f"  scalar tier: {len(tiered) - len(tile)} cases, refused by the tile tier because:")
    for r in tiered:
        if r["tier"] != "tile":
            print(f"    {r['case']}: {r['refusal']}")


def cmd_compile(args) -> int:
    from concordia.lowering import render_source
    m = _load_module_from(args.file)
    kernels = [k for k in m.kernels if args.kernel in (None, k.name)]
    if not kernels:
        raise ConcordiaError(f"{args.file}: no kernel named {args.kernel!r} "
                             f"(it has {', '.join(k.name for k in m.kernels)})")
    if args.emit in ("ir", "verified"):
        target = Target(args.target, args.arch or "")
        return _emit_text("\n".join(stage_text(compile_program(k, target, until=args.emit), args.emit)
                                    for k in kernels), args.output)
    if args.target == "tt":
        return _compile_tt(args, kernels)
    if args.emit in ("tt-lang", "metalium"):
        raise ConcordiaError(f"--emit {args.emit} needs --target tt")
    if args.emit == "source":
        return _emit_text("\n".join(render_source(k, args.target) for k in kernels), args.output)
    if len(kernels) > 1:
        raise ConcordiaError(f"{args.file} has {len(kernels)} kernels; pick one with --kernel NAME")
    k = kernels[0]
    binary = _compile_binary(k, args.target, args.arch)
    out = args.output or f"{k.name}.{_BINARY_EXT[args.target]}"
    with open(out, "wb") as fh:
        fh.write(binary)
    print(f"wrote {out} ({len(binary)} bytes, {args.target} {args.arch or _DEFAULT_ARCH[args.target]})")
    return 0


def _compile_tt(args, kernels) -> int:
    """Tenstorrent: the tile tier's TT-Lang program, the scalar tier's TT-Metalium C++, or
    (binary) that C++ built for the baby cores' rv32im ISA."""
    from concordia.lowering.tt_lang import TileRefusal, plan_tiles
    from concordia.lowering.tt_metalium import compile_riscv, render_metalium
    if args.emit == "binary":
        if len(kernels) > 1:
            raise ConcordiaError(f"{args.file} has {len(kernels)} kernels; pick one with --kernel NAME")
        k = kernels[0]
        binary = compile_riscv(render_metalium(k))
        out = args.output or f"{k.name}.rv32im.o"
        with open(out, "wb") as fh:
            fh.write(binary)
        print(f"wrote {out} ({len(binary)} bytes, TT-Metalium scalar tier, rv32im object)")
        return 0
    texts = []
    for k in kernels:
        if args.emit == "metalium":
            texts.append(render_metalium(k))
            continue
        try:
            texts.append(plan_tiles(k).source)
        except TileRefusal as e:
            if args.emit == "tt-lang":
                raise
            print(f"note: {e}; emitting the scalar tier (TT-Metalium C++)", file=sys.stderr)
            texts.append(render_metalium(k))
    return _emit_text("\n".join(texts), args.output)


def _emit_text(text: str, output: str | None) -> int:
    """Generated source to `output`, or to stdout."""
    if output:
        with open(output, "w") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


_BINARY_EXT = {"cuda": "cubin", "hip": "co", "opencl": "clbin"}
_DEFAULT_ARCH = {"cuda": "sm_90", "hip": "gfx1201", "opencl": "the default OpenCL device"}


def _compile_binary(k, target: str, arch: str | None) -> bytes:
    from concordia.lowering import render_source
    if target in ("cuda", "hip"):
        program = compile_program(k, Target(target, arch or _DEFAULT_ARCH[target]), until="binary")
        return program.binary
    from concordia.backends.runtime import Runtime
    rt = Runtime(f"opencl:{arch}" if arch else "opencl")
    return rt.backend._build(render_source(k, "opencl"))


def _commit_kind(info: dict) -> str:
    """What a commit closes, from its info: a base image (a full checkpoint's or a compacted
    log's) or a delta, and whether the base left out its pages of zeros."""
    kind = "compacted base" if info.get("compacted") else "full" if info.get("full") else "delta"
    return kind + (", pages of zeros left out" if info.get("sparse") else "")


def cmd_log_inspect(args) -> int:
    import datetime
    from concordia.handlers.log import COMMIT, KIND_NAMES, LAYOUT, PAGE_KINDS, SCATTER, pages_in, scan_log
    scan = scan_log(args.file)
    created = datetime.datetime.fromtimestamp(scan.created, datetime.timezone.utc)
    print(f"{args.file}: Concordia delta log v{scan.version}, {scan.file_size} bytes, "
          f"created {created.isoformat(timespec='seconds')}")
    counts = {k: 0 for k in KIND_NAMES.values()}
    rows, pages, nbytes, page_size = [], 0, 0, 1
    for r in scan.records:
        counts[KIND_NAMES[r.kind]] += 1
        if r.kind == LAYOUT:
            lay = json.loads(r.payload)
            regs = ", ".join(f"{x['name']} ({x['nbytes']} B, {x['dtype']})" for x in lay["regions"])
            print(f"  layout at byte {r.offset}: page size {lay['page_size']} B; regions: {regs}")
            page_size = lay["page_size"]
        elif r.kind in PAGE_KINDS:
            pages += pages_in(r.kind, r.payload, page_size)
            nbytes += len(r.payload) - (8 * r.page if r.kind == SCATTER else 0)   # not its index
        elif r.kind == COMMIT:
            info = json.loads(r.payload)
            rows.append((r.page, pages, nbytes, r.offset, _commit_kind(info)))
            pages = nbytes = 0
    print(f"  records: {len(scan.records)} ({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"  {'checkpoint':>10} {'pages':>8} {'bytes':>12} {'at byte':>12}  kind")
    for cid, pg, nb, off, kind in rows:
        print(f"  {cid:>10} {pg:>8} {nb:>12} {off:>12}  {kind}")
    tail = len(scan.records) - (scan.commit_ends[-1] if scan.commit_ends else 0)
    if tail:
        print(f"  {tail} record(s) after the last commit: uncommitted, dropped on recovery")
    if scan.problem:
        kind = "torn tail" if scan.torn else (
            f"CORRUPT mid-file (checkpoint {scan.damaged_checkpoint}; commits beyond it: "
            f"{', '.join(map(str, scan.later_commits)) or 'none'})")
        print(f"  stops at byte {scan.problem_offset}: {scan.problem}: {kind}")
    return 0


def cmd_log_verify(args) -> int:
    from concordia.handlers.log import scan_log
    scan = scan_log(args.file)
    if scan.corrupt:
        raise scan.corruption_error()
    if scan.problem:
        keep = (f"recovery uses checkpoint {scan.last_checkpoint}" if scan.commit_ends
                else "no commit before it")
        raise ConcordiaError(f"{args.file}: at byte {scan.problem_offset}: {scan.problem}: a torn "
                             f"tail ({keep}; the next append, or `concordia log repair`, cuts it)")
    if not scan.commit_ends:
        raise ConcordiaError(f"{args.file}: at byte {scan.end}: the log holds no committed checkpoint")
    tail = len(scan.records) - scan.commit_ends[-1]
    note = f"; {tail} uncommitted record(s) at the end" if tail else ""
    print(f"{args.file}: sound: {len(scan.records)} records, {len(scan.commit_ends)} commits, "
          f"{scan.file_size} bytes{note}")
    return 0


def cmd_log_repair(args) -> int:
    from concordia.handlers.log import repair
    done = repair(args.file, args.to_checkpoint)
    print(f"{args.file}: backup of all {done.cut_at + done.dropped_bytes} bytes in {done.backup}")
    if done.problem:
        print(f"  damage found: {done.problem}")
    if done.dropped_bytes:
        dropped = (", ".join(map(str, done.dropped_commits)) if done.dropped_commits else "none")
        print(f"  cut at byte {done.cut_at}: dropped {done.dropped_bytes} bytes; "
              f"commits dropped: {dropped}")
    else:
        print("  nothing to cut: the log ends at that commit")
    print(f"  kept: checkpoint {done.kept_checkpoint} and every commit before it")
    return 0


def cmd_log_compact(args) -> int:
    import os
    from concordia.handlers.log import compact
    before = os.path.getsize(args.file) if os.path.exists(args.file) else 0
    after = compact(args.file)
    print(f"{args.file}: compacted {before} -> {after} bytes")
    return 0


def cmd_demo(args) -> int:
    from concordia.demo import run_demo
    path = [p.strip() for p in args.path.split(",") if p.strip()] if args.path else None
    result = run_demo(path, args.items, args.steps, args.json)
    return 0 if result["verified"] else 1


def cmd_failover(args) -> int:
    try:
        import ray  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise ConcordiaError(f"concordia failover needs Ray and torch ({e.name} is missing): "
                             "pip install 'concordia[cluster]' torch") from None
    from concordia.cluster.run import failover_main
    return failover_main(args)


BENCHES = {
    "interpreter": "reference interpreter throughput",
    "kernels": "lowered vs hand-written CUDA, compile, launch",
    "checkpoint": "Figure 1: one dirty page, scan vs copy, log",
    "migration": "safepoint overhead, pause latency, migration time",
    "dispatch": "persistent ring vs cuLaunchKernel vs CUDA graph: latency heatmap, small tasks",
    "dispatch_sass": "the dispatcher's handler loop from its SASS: loads in flight (no GPU)",
    "llm": "Qwen3 decode with per-step checkpoints: tokens/s, checkpoint ms, recovery",
    "llm_long": "10,000 steps with compaction: the log's size over time, recovery",
    "hf_guard": "GenerationGuard on transformers' generate: tok/s, steady rate, first calls",
    "hf_guard_ablation": "the guard with parts of its writer taken out, the collector off",
    "hf_first_call": "the guard's first call of a generate call by part: opening, the base image",
    "profile_async": "where checkpoint_async's time goes in a live decode (torch.profiler)",
    "profile_decode": "where a decode step's time goes, with and without checkpoints",
    "decode_timeline": "a decode step's device time by part (graph, read-back, capture, idle), run by run",
    "profile_capture": "a checkpoint capture's graph nodes, in the stream and forked (torch.profiler)",
}


def cmd_bench(args) -> int:
    """`concordia bench NAME [ARGS...]` runs bench/NAME.py from the source checkout."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if not args.name:
        print("Benchmarks (each prints a table and writes JSON, and a PNG where it plots, to "
              "bench/results/):")
        width = max(map(len, BENCHES))
        for name, what in BENCHES.items():
            print(f"  concordia bench {name:<{width}}  {what}")
        return 0
    if args.name not in BENCHES:
        raise ConcordiaError(f"no benchmark {args.name!r}; there are: {', '.join(BENCHES)}")
    script = os.path.join(root, f"{args.name}.py")
    if not os.path.exists(script):
        raise ConcordiaError(f"{script} not found: benchmarks run from a source checkout "
                             "(pip install -e .)")
    sys.argv = [f"concordia bench {args.name}", *args.rest]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    except ModuleNotFoundError as e:   # a benchmark's own dependency (torch, transformers)
        if (e.name or "").split(".")[0] in ("concordia", "concordia_ir", "bench"):
            raise   # ours: a fault, not a missing install
        raise ConcordiaError(f"concordia bench {args.name} needs {e.name}, which is not "
                             "installed here") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="concordia", description=(
        "Portable GPU state: kernels and checkpoint handlers in one IR, run on any backend."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ir = sub.add_parser("ir", help="check or print IR (from a .py file of @kernel functions or IR text)")
    irs = ir.add_subparsers(dest="ir_command", metavar="ACTION")
    c = irs.add_parser("check", help="parse and verify; exit 1 with file:line on the first error")
    c.add_argument("file")
    c.set_defaults(func=cmd_ir_check)
    pr = irs.add_parser("print", help="print the IR text of every kernel in FILE")
    pr.add_argument("file")
    pr.set_defaults(func=cmd_ir_print)

    b = sub.add_parser("backends", help="list backends, whether each can run here and why not")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backends)

    cf = sub.add_parser("conformance", help="run the conformance suite: every backend must "
                                             "equal the reference interpreter bit for bit")
    cf.add_argument("--backend", nargs="+", metavar="NAME",
                    help="backends to check (default: every available one)")
    cf.add_argument("--json", metavar="FILE", help="write the per-case report here")
    cf.add_argument("-k", metavar="TEXT", help="only cases whose name contains TEXT")
    cf.set_defaults(func=cmd_conformance)

    co = sub.add_parser("compile", help="lower the kernels of FILE to source or a binary")
    co.add_argument("file", help="a .py file of @kernel functions or IR text")
    co.add_argument("--target", required=True, choices=["opencl", "cuda", "hip", "tt"])
    co.add_argument("--arch", help="sm_90 (cubin), compute_90 (PTX), gfx1201 ..., or an "
                                   "OpenCL device index")
    co.add_argument("--emit", choices=[*STAGE_NAMES, "tt-lang", "metalium"], default="source",
                    metavar="STAGE",
                    help="the stage to dump: " + "; ".join(f"{s.name} = {s.doc}" for s in STAGES)
                         + ". tt: source = the tile tier's TT-Lang where it accepts the kernel, "
                         "else TT-Metalium C++; tt-lang / metalium force a tier; binary = rv32im "
                         "object")
    co.add_argument("--kernel", help="only this kernel")
    co.add_argument("-o", "--output", help="output file (binary default: KERNEL.cubin/.co/.clbin)")
    co.set_defaults(func=cmd_compile)

    lg = sub.add_parser("log", help="inspect, verify, repair or compact a delta log")
    lgs = lg.add_subparsers(dest="log_command", metavar="ACTION")
    for action, fn, text in (("inspect", cmd_log_inspect, "records, checkpoints, sizes"),
                             ("verify", cmd_log_verify, "exit 0 if sound, else 1 with offset and reason"),
                             ("repair", cmd_log_repair, "back the file up, then cut it after the "
                                                        "last sound commit (or --to-checkpoint N)"),
                             ("compact", cmd_log_compact, "fold the log into one base image")):
        sp = lgs.add_parser(action, help=text)
        sp.add_argument("file")
        if action == "repair":
            sp.add_argument("--to-checkpoint", type=int, metavar="N",
                            help="keep checkpoints up to N (a sound commit), drop the rest")
        sp.set_defaults(func=fn)

    dm = sub.add_parser("demo", help="migrate a running kernel across backends and verify it "
                                      "bit for bit against an uninterrupted run")
    dm.add_argument("--path", help="comma-separated backends, e.g. cuda,opencl,reference "
                                   "(default: every device backend here; reference on a CPU machine)")
    dm.add_argument("--items", type=int, help="work-items (default: by the path's slowest backend)")
    dm.add_argument("--steps", type=int, help="loop iterations per work-item")
    dm.add_argument("--json", metavar="FILE", help="write the timeline and hashes here")
    dm.set_defaults(func=cmd_demo)

    fo = sub.add_parser("failover", help="decode on Ray workers, SIGKILL some, recover them on "
                                         "warm standbys; print the recovery timeline")
    fo.add_argument("--workers", type=int, default=2, help="decode workers, one job each")
    fo.add_argument("--standby", type=int, default=1, help="warm standbys")
    fo.add_argument("--kill", type=int, default=1, help="SIGKILL this many times at random steps")
    fo.add_argument("--hang", type=int, default=0, help="SIGSTOP this many workers (hung: found by "
                                                       "the heartbeat deadline)")
    fo.add_argument("--slow", type=int, default=0, help="this many workers sleep each step (a "
                                                       "slow worker must not be declared dead)")
    fo.add_argument("--kill-standby", type=int, default=0,
                    help="SIGKILL this many standbys in the middle of their takeover")
    fo.add_argument("--tp", type=int, default=1, choices=[1, 2],
                    help="2: one tensor-parallel job over two ranks (torch.distributed; "
                         "--workers is not used)")
    fo.add_argument("--backend", help="the workers' backend (default: cuda on a GPU, else "
                                      "reference)")
    fo.add_argument("--standby-backend", help="the standbys' backend (default: the workers'); "
                                              "another vendor's for a cross-vendor recovery")
    fo.add_argument("--config", default="tiny", help="model size: tiny or qwen3-0.6b")
    fo.add_argument("--batch", type=int, default=2, help="requests (sequences) per worker")
    fo.add_argument("--prompt", type=int, default=8, help="prompt tokens per request")
    fo.add_argument("--tokens", type=int, default=32, help="tokens to generate per request")
    fo.add_argument("--deadline", type=float, default=2.0,
                    help="seconds without heartbeat or progress before a worker is declared hung")
    fo.add_argument("--seed", type=int, default=0, help="the faults' random steps")
    fo.add_argument("--log-dir", help="keep the workers' logs here (default: a temporary folder)")
    fo.add_argument("--json", metavar="FILE", help="write the report here")
    fo.set_defaults(func=cmd_failover)

    bn = sub.add_parser("bench", help="run a benchmark (bench/NAME.py); no NAME lists them")
    bn.add_argument("name", nargs="?", help=", ".join(BENCHES))
    bn.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark, e.g. --json FILE")
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        sub = parser._subparsers._group_actions[0].choices.get(args.command) if args.command else None
        (sub or parser).print_help()
        return 2
    try:
        return args.func(args)
    except ConcordiaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

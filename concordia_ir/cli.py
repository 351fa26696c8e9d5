"""The `concordia` command. User mistakes end in one line on stderr and exit 1."""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys

from .errors import ConcordiaError


def _load_module_from(path: str):
    """IR module from a .py file of @kernel functions or from IR text."""
    from .frontend import KernelFunction
    from .ops import Module
    from .parser import parse_file
    from .verifier import verify_module
    if not os.path.exists(path):
        raise ConcordiaError(f"{path}: no such file")
    if not path.endswith(".py"):
        return verify_module(parse_file(path))
    try:
        scope = runpy.run_path(path, run_name="__concordia_load__")
    except SyntaxError as e:
        raise ConcordiaError(f"{e.filename}:{e.lineno}: Python syntax error: {e.msg}") from None
    except ConcordiaError:
        raise
    except Exception as e:  # the user's module failed to import
        raise ConcordiaError(f"{path}: importing it failed: {type(e).__name__}: {e}") from None
    kernels = [v.kernel for v in scope.values() if isinstance(v, KernelFunction)]
    if not kernels:
        raise ConcordiaError(f"{path}: no @kernel functions found")
    return verify_module(Module(tuple(kernels)))


def cmd_ir_check(args) -> int:
    m = _load_module_from(args.file)
    print(f"{args.file}: ok ({len(m.kernels)} kernel{'s' if len(m.kernels) != 1 else ''}: "
          f"{', '.join(k.name for k in m.kernels)})")
    return 0


def cmd_ir_print(args) -> int:
    from .printer import print_module
    sys.stdout.write(print_module(_load_module_from(args.file)))
    return 0


def cmd_backends(args) -> int:
    from backends import backend_status
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


def _later(issue: int, what: str):
    def run(args) -> int:
        raise ConcordiaError(f"'concordia {what}' is not built yet (tracked in issue {issue})")
    return run


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

    for name, issue, text in (("conformance", 4, "run the conformance suite on backends"),
                              ("compile", 4, "lower a kernel file to source or a binary"),
                              ("demo", 9, "migrate a running workload across backends"),
                              ("log", 5, "inspect or verify a delta log"),
                              ("bench", 4, "run benchmarks")):
        sp = sub.add_parser(name, help=text)
        sp.set_defaults(func=_later(issue, name))
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) not in (None,) and args.command not in (
            "conformance", "compile", "demo", "log", "bench"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        (parser if args.command != "ir" else parser._subparsers._group_actions[0]
         .choices["ir"]).print_help()
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

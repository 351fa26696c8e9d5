"""The conformance suite: every case on a backend must equal the reference interpreter.

`run_suite(["opencl"])` returns a report; `concordia conformance` prints and saves it.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from concordia_ir.errors import ConcordiaError
from concordia_ir.types import PtrType

from ..runtime import Runtime

from .cases import Case, all_cases

__all__ = ["Case", "all_cases", "run_case", "expected_outputs", "compare_outputs", "run_suite"]

_EXPECTED: dict[str, dict[str, np.ndarray]] = {}


def run_case(case: Case, runtime, seed: int = 0) -> dict[str, np.ndarray]:
    """Launch a case on a runtime; every pointer argument's final content, by parameter name."""
    args = case.make_args(np.random.default_rng(seed))
    dev = [runtime.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    runtime.launch(case.kernel, global_size=case.global_size, local_size=case.local_size, args=dev)
    out = {}
    for p, a in zip(case.kernel.params, dev):
        if isinstance(p.type, PtrType):
            out[p.name] = a.numpy()
            runtime.free(a)
    return out


def expected_outputs(case: Case) -> dict[str, np.ndarray]:
    if case.name not in _EXPECTED:
        _EXPECTED[case.name] = run_case(case, Runtime("reference"))
    return _EXPECTED[case.name]


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(f"u{a.dtype.itemsize}") if a.dtype.kind in "fiu" else a


def compare_outputs(case: Case, got: dict, want: dict) -> str | None:
    """None when equal; otherwise what differs, first element first."""
    for name, w in want.items():
        g = got[name]
        if name in case.multiset:
            if not np.array_equal(np.sort(g), np.sort(w)):
                return f"{name}: multisets differ"
            continue
        same = _bits(g) == _bits(w)
        if g.dtype.kind == "f":
            same |= np.isnan(g) & np.isnan(w)   # NaN payloads are the vendor's (semantics.md)
        if not same.all():
            i = int(np.argmin(same))
            return (f"{name}[{i}]: got {g[i]!r} (bits {_bits(g)[i]:#x}), "
                    f"expected {w[i]!r} (bits {_bits(w)[i]:#x}); {int((~same).sum())} differ")
    return None


def run_suite(backends: list[str], cases: list[Case] | None = None,
              progress: Callable[[str, int, int, str], None] | None = None) -> dict:
    """Run cases on each backend. Report: backend -> passed/failed/skipped + per-case rows."""
    cases = cases if cases is not None else all_cases()
    report = {}
    for name in backends:
        rows, counts = [], {"passed": 0, "failed": 0, "skipped": 0}
        try:
            rt = Runtime(name)
        except ConcordiaError as e:
            report[name] = {"available": False, "reason": str(e), **counts,
                            "skipped": len(cases), "cases": []}
            continue
        for k, case in enumerate(cases):
            t0 = time.perf_counter()
            try:
                want = expected_outputs(case)
                detail = compare_outputs(case, run_case(case, rt), want)
                status = "passed" if detail is None else "failed"
            except ConcordiaError as e:
                status, detail = "failed", f"error: {e}"
            counts[status] += 1
            row = {"case": case.name, "status": status, "detail": detail,
                   "seconds": round(time.perf_counter() - t0, 4)}
            if getattr(rt.backend, "last_tier", None):   # backends with tiers say which ran it
                row["tier"] = rt.backend.last_tier
                row["refusal"] = rt.backend.last_refusal
                rt.backend.last_tier = None
            rows.append(row)
            if progress:
                progress(name, k + 1, len(cases), status)
        report[name] = {"available": True, "device": rt.backend.device_info(), **counts,
                        "cases": rows}
    return report

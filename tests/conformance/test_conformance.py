"""Every conformance case on every backend present equals the reference interpreter bit for bit.

Backends that cannot run here are skipped with their reason (e.g. no CUDA driver); the CUDA
and HIP lowerings are still compiled to real binaries by tests/test_lowering.py.
"""
import pytest

from concordia.backends import BACKENDS, backend_status
from concordia.backends.conformance import all_cases, compare_outputs, expected_outputs, run_case

CASES = all_cases()
DEVICE_BACKENDS = [n for n in BACKENDS if n != "reference"]
_STATUS = backend_status()
_RUNTIMES = {}


def runtime(name):
    from concordia import Runtime
    if name not in _RUNTIMES:
        _RUNTIMES[name] = Runtime(name)
    return _RUNTIMES[name]


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_matches_reference(backend, case):
    st = _STATUS[backend]
    if not st.ok:
        pytest.skip(f"{backend}: {st.reason}")
    got = run_case(case, runtime(backend))
    assert compare_outputs(case, got, expected_outputs(case)) is None


def test_suite_is_large_and_covers_the_issue():
    names = {c.name for c in CASES}
    assert len(CASES) >= 100
    for needed in ("micro_vector_add", "micro_divergent_flow", "micro_gemm_128", "micro_reduction",
                   "large_vector_add_64MiB", "div_i32", "shr_u64", "cast_f32_to_i32",
                   "mul_add_f32_unfused", "fma_f32", "atomic_histogram_global", "grid_3d_ragged"):
        assert needed in names


def test_comparison_catches_a_one_ulp_difference():
    import numpy as np
    case = next(c for c in CASES if c.name == "add_f32")
    want = expected_outputs(case)
    got = {k: v.copy() for k, v in want.items()}
    i = int(np.flatnonzero(np.isfinite(got["out"]) & (got["out"] != 0))[0])
    got["out"][i] = np.nextafter(got["out"][i], np.float32(np.inf))
    assert "out[" in compare_outputs(case, got, want)

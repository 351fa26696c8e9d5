"""Runtime: the issue's minimum surface, launch-argument errors, backend configuration."""
import numpy as np
import pytest

from concordia import (BackendUnavailable, ConcordiaError, LaunchError, Ptr, Runtime, f32, global_id, i32,
                          kernel)
from concordia.backends.runtime import resolve_backend


@kernel
def saxpy(a: f32, x: Ptr[f32], y: Ptr[f32], out: Ptr[f32], n: i32):
    i = global_id(0)
    if i < n:
        out[i] = a * x[i] + y[i]


@pytest.fixture
def rt():
    return Runtime("reference")


def test_minimum_surface(rt):
    x = rt.to_device(np.arange(1000, dtype=np.float32))
    y = rt.to_device(np.ones(1000, dtype=np.float32))
    out = rt.empty(1000, np.float32)
    rt.launch(saxpy, global_size=1024, local_size=64,
              args=(np.float32(2.0), x, y, out, np.int32(1000)))
    assert out.numpy()[:4].tolist() == [1.0, 3.0, 5.0, 7.0]
    assert np.array_equal(out.numpy(), np.arange(1000, dtype=np.float32) * 2 + 1)
    assert saxpy.ir.startswith("kernel @saxpy(%a: f32, %x: ptr<global f32>")


@pytest.mark.parametrize("backend", [b for b in ("reference", "cuda")
                                     if __import__("concordia").backend_status()[b].ok])
def test_a_part_of_a_mapped_buffer_is_its_elements_on_device_and_host(backend):
    """DeviceBuffer.part: a kernel writing a part writes those elements of the whole, and
    the part's .host is the same bytes; a part past the end is refused in one line."""
    rt = Runtime(backend)
    whole = rt.mapped(64, np.float32)
    x = rt.to_device(np.arange(16, dtype=np.float32))
    y = rt.to_device(np.zeros(16, dtype=np.float32))
    part = whole.part(20, 16)
    rt.launch(saxpy, global_size=64, local_size=64,
              args=(np.float32(3.0), x, y, part, np.int32(16)))
    rt.synchronize()
    want = np.zeros(64, np.float32)
    want[20:36] = 3 * np.arange(16)
    assert np.array_equal(whole.host, want)
    assert np.array_equal(part.host, want[20:36])
    with pytest.raises(LaunchError, match=r"part \[60, 70\) of a buffer of 64"):
        whole.part(60, 10)
    rt.free_mapped(whole)


@pytest.mark.parametrize("backend", [b for b in ("reference", "opencl", "cuda", "tenstorrent")
                                     if __import__("concordia").backend_status()[b].ok])
def test_read_into_fills_each_array_with_its_buffer_after_the_launches(backend):
    """Runtime.read_into: several buffers read with one wait (cuda: as many as its bounce
    buffer holds, then the rest; one larger than it on its own), each array its buffer's
    first elements, as the launches before left them."""
    rt = Runtime(backend)
    sizes = [16, 3, 1 << 18, 1, (5 << 20) // 4, 7, 0]
    bufs = [rt.to_device(np.arange(n, dtype=np.float32) * (k + 1)) for k, n in enumerate(sizes)]
    y = rt.to_device(np.ones(16, np.float32))
    rt.launch(saxpy, global_size=16, local_size=16,
              args=(np.float32(2.0), bufs[0], y, bufs[0], np.int32(16)))
    outs = [np.full(max(0, n - 1), -1, np.float32) for n in sizes]   # all but the last element
    rt.read_into(list(zip(bufs, outs)))
    for k, (n, out) in enumerate(zip(sizes, outs)):
        want = np.arange(n, dtype=np.float32)[:max(0, n - 1)] * (k + 1)
        np.testing.assert_array_equal(out, 2 * want + 1 if k == 0 else want)


def _bufs(rt):
    return rt.to_device(np.zeros(8, np.float32)), rt.to_device(np.zeros(8, np.float32)), rt.empty(8, np.float32)


@pytest.mark.parametrize("args,match", [
    (lambda b: (np.float64(2.0), *b, np.int32(8)), r"argument 0 \(a\) expects f32 \(float32\), got float64"),
    (lambda b: (np.float32(2.0), *b), r"takes 5 arguments \(a, x, y, out, n\), got 4"),
    (lambda b: (np.float32(2.0), b[0], b[1], np.zeros(8, np.float32), 8), r"argument 3 \(out\) expects a device buffer"),
    (lambda b: (np.float32(2.0), *b, 2**40), r"argument 4 \(n\): 1099511627776 does not fit in i32"),
    (lambda b: (np.float32(2.0), *b, "8"), r"argument 4 \(n\) expects a i32 scalar, got str"),
])
def test_wrong_launch_arguments(rt, args, match):
    with pytest.raises(LaunchError, match=match):
        rt.launch(saxpy, global_size=8, local_size=8, args=args(_bufs(rt)))


def test_wrong_buffer_dtype(rt):
    x, y, out = _bufs(rt)
    xi = rt.to_device(np.zeros(8, np.int32))
    with pytest.raises(LaunchError, match=r"argument 1 \(x\) expects a buffer of f32 \(float32\), got int32"):
        rt.launch(saxpy, global_size=8, local_size=8, args=(2.0, xi, y, out, 8))


@pytest.mark.parametrize("g,l,match", [
    (1000, 64, r"global_size\[0\] = 1000 is not a multiple of local_size\[0\] = 64"),
    ((8, 8, 8, 8), 8, "1 to 3 ints"),
    (0, 1, "must be positive"),
    ((64, 64), (64, 32), "at most 1024"),
    (None, 64, "must be an int or a tuple of 1 to 3 ints, got None"),
    (64.0, 64, "must be an int or a tuple of 1 to 3 ints, got 64.0"),
])
def test_bad_geometry(rt, g, l, match):
    with pytest.raises(LaunchError, match=match):
        rt.launch(saxpy, global_size=g, local_size=l, args=(2.0, *_bufs(rt), 8))


def test_buffer_from_another_runtime(rt):
    other = Runtime("reference")
    x, y, out = _bufs(rt)
    with pytest.raises(LaunchError, match="lives on another runtime"):
        rt.launch(saxpy, global_size=8, local_size=8, args=(2.0, other.to_device(np.zeros(8, np.float32)), y, out, 8))


def test_unsupported_dtype(rt):
    with pytest.raises(LaunchError, match="float16 cannot go to a device"):
        rt.to_device(np.zeros(4, np.float16))


def test_backend_choice_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONCORDIA_BACKEND", raising=False)
    (tmp_path / "concordia.toml").write_text('[runtime]\nbackend = "reference:0"\n')
    spec, source = resolve_backend()
    assert (str(spec), source) == ("reference:0", "concordia.toml")
    monkeypatch.setenv("CONCORDIA_BACKEND", "reference")
    assert resolve_backend()[1] == "CONCORDIA_BACKEND"
    assert resolve_backend("reference:1") == (resolve_backend("reference:1")[0], "argument")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nosuch'"):
        Runtime("nosuch")


def test_broken_config_file_is_one_line(tmp_path, monkeypatch):
    from concordia import ConcordiaError
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONCORDIA_BACKEND", raising=False)
    (tmp_path / "concordia.toml").write_text("[runtime\n")
    with pytest.raises(ConcordiaError, match="concordia.toml: cannot read"):
        Runtime()


@pytest.mark.skipif(not __import__("concordia").backend_status()["opencl"].ok,
                    reason="no OpenCL device (pyopencl[pocl] not installed)")
def test_opencl_compiler_output_is_kept_not_warned():
    import warnings
    backend = Runtime("opencl").backend
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # pyopencl's CompilerWarning would raise here
        backend._build("#warning note-from-the-compiler\n"
                       "__kernel void k(__global int* x) { x[0] = 1; }")
    assert "note-from-the-compiler" in backend.build_log
    with pytest.raises(ConcordiaError, match="OpenCL build failed on .*undeclared"):
        backend._build("__kernel void k(__global int* x) { x[0] = y; }")

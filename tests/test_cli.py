"""The `concordia` command as a user runs it: exit codes and one-line errors."""
import os
import subprocess
import sys

import pytest


def concordia(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "concordia", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_help_lists_subcommands():
    r = concordia("--help")
    assert r.returncode == 0
    for sub in ("backends", "conformance", "compile", "demo", "log", "bench", "ir"):
        assert sub in r.stdout


def test_ir_check_valid_python_file(tmp_path):
    f = tmp_path / "good.py"
    f.write_text("from concordia import kernel, Ptr, f32, global_id\n\n"
                 "@kernel\ndef k(x: Ptr[f32]):\n    x[global_id(0)] = 1.0\n")
    r = concordia("ir", "check", str(f))
    assert r.returncode == 0 and "ok (1 kernel: k)" in r.stdout


def test_ir_check_invalid_python_file_is_one_line(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from concordia import kernel, Ptr, f32, i32\n\n"
                 "@kernel\ndef k(x: Ptr[f32], n: i32):\n    x[0] = x[0] + n\n")
    r = concordia("ir", "check", str(f))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and f"{f}:5:" in r.stderr and "Traceback" not in r.stderr


def test_ir_check_of_a_file_without_kernels_names_it(tmp_path):
    f = tmp_path / "none.py"
    f.write_text("from concordia import kernel\n\n\ndef k():\n    pass\n")   # forgot the @
    r = concordia("ir", "check", str(f))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"{f}:1: no @kernel functions found" in r.stderr and "Traceback" not in r.stderr


def test_ir_check_ir_text(tmp_path):
    good = tmp_path / "good.cir"
    good.write_text("kernel @k(%p: ptr<global i32>) {\n  return\n}\n")
    assert concordia("ir", "check", str(good)).returncode == 0
    bad = tmp_path / "bad.cir"
    bad.write_text("kernel @k(%p: ptr<global i32>) {\n  %0 = const [value = 1] : i32\n}\n")
    r = concordia("ir", "check", str(bad))
    assert r.returncode == 1 and r.stderr.startswith(f"error: {bad}:2:") and "missing return" in r.stderr


def test_ir_print_round_trips(tmp_path):
    f = tmp_path / "k.py"
    f.write_text("from concordia import kernel, Ptr, f32, global_id\n\n"
                 "@kernel\ndef k(x: Ptr[f32]):\n    x[global_id(0)] = 1.0\n")
    r = concordia("ir", "print", str(f))
    assert r.returncode == 0 and r.stdout.startswith("kernel @k(")
    out = tmp_path / "k.cir"
    out.write_text(r.stdout)
    assert concordia("ir", "check", str(out)).returncode == 0


@pytest.mark.parametrize("args,match", [
    (("ir", "check", "/nonexistent.py"), "no such file"),
    (("bench", "nope"), "no benchmark 'nope'; there are: interpreter"),
    (("compile", "/nonexistent.py", "--target", "tt"), "no such file"),
])
def test_user_errors_are_one_line(args, match):
    r = concordia(*args)
    assert r.returncode == 1 and match in r.stderr and "Traceback" not in r.stderr


def test_backends_lists_reference():
    r = concordia("backends")
    assert r.returncode == 0 and "reference" in r.stdout


def test_log_inspect_names_each_commit_and_its_base(tmp_path):
    """`concordia log inspect` lists the format version, each checkpoint's pages and bytes and
    what its commit closes: a base image whose pages of zeros were left out, a delta, and after
    `log compact` the compacted base."""
    import numpy as np
    from concordia import Runtime
    from concordia.handlers import Checkpointer
    rt = Runtime("reference")
    host = np.zeros(16 * 1024, np.float32)   # 16 pages of 4 KiB, one of them not zeros
    host[5000] = 1
    kv = rt.to_device(host)
    path = str(tmp_path / "i.clog")
    with Checkpointer(rt, {"kv": kv}, path) as ck:
        ck.checkpoint()
        host[9000] = 2
        kv.write(host)
        ck.checkpoint()
    r = concordia("log", "inspect", path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "delta log v4" in lines[0]
    assert lines[-2].split()[:3] == ["1", "1", "4096"] and lines[-2].endswith(
        "full, pages of zeros left out")
    assert lines[-1].split()[:3] == ["2", "1", "4096"] and lines[-1].endswith("delta")
    assert concordia("log", "compact", path).returncode == 0
    r = concordia("log", "inspect", path)
    assert r.stdout.splitlines()[-1].split()[:2] == ["2", "2"]
    assert r.stdout.splitlines()[-1].endswith("compacted base, pages of zeros left out")


def test_a_benchmark_whose_dependency_is_missing_says_so_in_one_line():
    """torch is made unimportable in the child: `concordia bench llm` names it, no traceback."""
    code = ("import sys; sys.modules['torch'] = None; from concordia.cli import main; "
            "sys.exit(main(['bench', 'llm', '--batches', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == "error: concordia bench llm needs torch, which is not installed here"


def test_bench_lists_every_benchmark_script():
    """`concordia bench` names every script in bench/ (hf_guard, llm_long and the profilers
    were missing: `concordia bench hf_guard` said there was no such benchmark)."""
    import glob
    import os
    here = os.path.join(os.path.dirname(__file__), "..", "bench")
    scripts = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(here, "*.py"))} - {"common"}
    listed = concordia("bench").stdout
    assert all(f"concordia bench {name} " in listed for name in scripts), listed


def test_profile_capture_reads_a_captures_nodes_from_a_pipelined_trace():
    """bench/profile_capture.py's trace reading, on a made-up trace of the pipelined loop: a
    capture is what follows the step's read-back, its nodes on the decode stream up to the next
    step's first kernel, and its forked nodes on the side stream; the next step is not in it."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from bench.profile_capture import capture_nodes

    def x(name, stream, ts, dur=1.0, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}
    step = [x("gemm", 7, t) for t in (0, 10, 20)]
    events = step + [x("Memcpy DtoH (Device -> Pinned)", 7, 30, cat="gpu_memcpy"),
                     x("list_kv_pages", 7, 31), x("advance_kv_pages", 7, 33),
                     x("gemm", 7, 35),                                   # the next step
                     x("gather_counted", 9, 36, 5.0), x("Memcpy DtoH (Device -> Pinned)", 9, 42, cat="gpu_memcpy"),
                     x("gemm", 7, 45), x("list_kv_pages", 7, 80), x("gemm", 7, 85)]
    caps = capture_nodes({"traceEvents": events})
    assert len(caps) == 2
    assert [(n[0][:14], n[1], n[2]) for n in caps[0]] == [
        ("list_kv_pages", 7, 0.0), ("advance_kv_pag", 7, 2.0),
        ("gather_counted", 9, 5.0), ("Memcpy DtoH (D", 9, 11.0)]
    assert [n[0] for n in caps[1]] == ["list_kv_pages"]

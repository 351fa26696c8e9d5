"""`concordia demo` as a user runs it: a verified migration and the JSON it promises."""
import json
import subprocess
import sys

import pytest

from concordia.backends import backend_status

PATHS = [["reference", "reference"]] + ([["opencl", "reference", "opencl"]]
                                        if backend_status()["opencl"].ok else [])


@pytest.mark.parametrize("path", PATHS, ids=["-".join(p) for p in PATHS])
def test_demo_verifies_and_writes_its_timeline(tmp_path, path):
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "concordia", "demo", "--path", ",".join(path),
                        "--items", "2048", "--steps", "600", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "verified: yes, bit for bit" in r.stdout
    d = json.loads(out.read_text())
    assert d["verified"] is True and d["hash_uninterrupted"] == d["hash_migrated"]
    assert len(d["hops"]) == len(path) - 1
    for hop in d["hops"]:
        assert {"from", "to", "bytes", "pause_s", "snapshot_s", "transfer_s", "compile_s",
                "restore_s", "resume_s"} <= set(hop) and hop["bytes"] > 0 and hop["verified"]
        assert 0 < hop["progress_at_pause"] < 1, hop          # a live kernel at every hop


def test_default_demo_makes_two_live_hops_over_three_backends(tmp_path):
    out = tmp_path / "demo.json"
    r = subprocess.run([sys.executable, "-m", "concordia", "demo", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["verified"] and len(set(d["path"])) >= 3 and len(d["hops"]) >= 2
    at = [h["progress_at_pause"] for h in d["hops"]]
    assert all(0 < p < 1 for p in at) and at == sorted(at), at


def test_demo_with_an_unknown_backend_is_one_line():
    r = subprocess.run([sys.executable, "-m", "concordia", "demo", "--path", "opencl,nosuch"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "unknown backend 'nosuch'" in r.stderr and "Traceback" not in r.stderr

"""A bench script run as a user runs it, with arguments it must refuse."""
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")


def usage_error(script: str, *args: str, timeout: int = 300) -> str:
    """bench/`script` run with `args` must stop with a usage error (exit 2) and no traceback;
    returns its last line."""
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    return r.stderr.splitlines()[-1]

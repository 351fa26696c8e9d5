"""Crash tests: a child checkpoints in a loop and is killed with SIGKILL at random moments;
recovery must give exactly the last committed state, and never lose a commit that the child
saw returned with fsync=always.

The child is forked from this (already initialised) process so that each kill point costs
milliseconds. CONCORDIA_CRASH_POINTS sets the number of kill points (default 200; the README
documents a 1000-point run)."""
import hashlib
import os
import signal
import time

import numpy as np
import pytest

from concordia import Runtime
from concordia.handlers import Checkpointer, LogError, scan_log

PAGES, PAGE = 8, 4096
WORDS = PAGES * PAGE // 4
STEPS = 40


def state_after(seed: int, step: int, prev: np.ndarray | None = None) -> np.ndarray:
    """The region after `step` mutations: deterministic, so parent and child agree."""
    s = np.zeros(WORDS, np.uint32) if prev is None else prev.copy()
    if step == 0:
        return s
    rng = np.random.default_rng([seed, step])
    for p in rng.choice(PAGES, rng.integers(1, 4), replace=False):
        lo = p * PAGE // 4
        s[lo:lo + PAGE // 4] = rng.integers(0, 2**32, PAGE // 4, dtype=np.uint32)
    return s


def expected_hashes(seed: int) -> list[str]:
    out, s = [], None
    for step in range(STEPS):
        s = state_after(seed, step, s)
        out.append(hashlib.sha256(s.tobytes()).hexdigest())
    return out


def child(path: str, seed: int, report_fd: int):
    rt = Runtime("reference")
    buf = rt.to_device(np.zeros(WORDS, np.uint32))
    ck = Checkpointer(rt, {"state": buf}, path, page_size=PAGE, fsync="always")
    s = None
    for step in range(STEPS):
        s = state_after(seed, step, s)
        buf.write(s)
        stats = ck.checkpoint()
        os.write(report_fd, stats.checkpoint_id.to_bytes(4, "little"))   # after commit returned


def kill_point(tmp, seed: int, delay: float):
    path = os.path.join(tmp, f"crash-{seed}.clog")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                      # the child: never returns into pytest
        try:
            os.close(r)
            child(path, seed, w)
        finally:
            os._exit(0)
    os.close(w)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    reported = 0
    while chunk := os.read(r, 4096):
        for i in range(0, len(chunk) - 3, 4):
            reported = max(reported, int.from_bytes(chunk[i:i + 4], "little"))
    os.close(r)
    return path, reported


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_at_random_points_loses_nothing_committed(tmp_path):
    points = int(os.environ.get("CONCORDIA_CRASH_POINTS", "200"))
    rng = np.random.default_rng(1234)
    outcomes = {"no commit yet": 0, "recovered": 0, "finished": 0}
    for k in range(points):
        seed = int(rng.integers(1 << 30))
        path, reported = kill_point(str(tmp_path), seed, float(rng.uniform(0, 0.08)))
        if not os.path.exists(path):            # killed before the log was created
            assert reported == 0
            outcomes["no commit yet"] += 1
            continue
        try:
            regions = Checkpointer.restore(path, Runtime("reference"))
        except LogError as e:
            assert "no committed checkpoint" in str(e) and reported == 0, (k, str(e))
            outcomes["no commit yet"] += 1
            os.remove(path)
            continue
        scan = scan_log(path)
        committed = scan.last_checkpoint                 # checkpoint id = step + 1
        assert committed >= reported, f"point {k}: commit {reported} was reported but lost"
        got = hashlib.sha256(regions["state"].numpy().tobytes()).hexdigest()
        assert got == expected_hashes(seed)[committed - 1], f"point {k}: wrong content"
        outcomes["finished" if committed == STEPS else "recovered"] += 1
        os.remove(path)
    assert outcomes["recovered"] > points // 4, outcomes   # most kills land mid-run

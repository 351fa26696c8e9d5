"""The paper's workload at a tiny size: a Qwen3-architecture decode loop checkpoints its KV cache,
adapter and scheduler state; it is SIGKILLed mid-generation; a new process restores from the
log (on another backend where one exists) and continues with exactly the uninterrupted tokens."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the decode loop is PyTorch: pip install torch")

from concordia.backends import backend_status  # noqa: E402
from concordia.handlers.scanners import KVBlockScanner  # noqa: E402
from tests.bench_usage import usage_error  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "llm_decode.py")
COMMON = ["--config", "tiny", "--device", "cpu", "--batch", "3", "--prompt", "6", "--tokens", "40",
          "--block-size", "8", "--adapter-every", "5"]
# checkpoints through the simulated Tenstorrent device where it is installed, restores on the
# reference interpreter: the log is the only thing the two processes share
CKPT_BACKEND = "tenstorrent" if backend_status()["tenstorrent"].ok else "reference"


def decode(*extra):
    return subprocess.run([sys.executable, SCRIPT, *COMMON, *extra], capture_output=True, text=True,
                          timeout=300)


def test_crash_restore_continue_gives_the_uninterrupted_tokens(tmp_path):
    want, got, log = tmp_path / "want.npy", tmp_path / "got.npy", tmp_path / "run.clog"
    r = decode("--out", str(want))
    assert r.returncode == 0, r.stderr
    r = decode("--log", str(log), "--every", "3", "--backend", CKPT_BACKEND, "--crash-after", "23")
    assert r.returncode == -9, r.stderr                    # SIGKILL: no clean shutdown
    r = decode("--log", str(log), "--resume", "--restore-backend", "reference", "--out", str(got))
    assert r.returncode == 0, r.stderr
    assert "resumed at position" in r.stdout
    restored_at = int(r.stdout.split("resumed at position ")[1].split()[0])
    assert 6 + 3 <= restored_at < 6 + 40                   # mid-generation, not at the start
    a, b = np.load(want), np.load(got)
    assert len(set(a[:, 6:].ravel().tolist())) > 10        # tokens that depend on the context
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kv_scan", ["host", "device"])
def test_async_checkpoints_crash_restore_continue(tmp_path, kv_scan):
    """checkpoint_async every step: the writer thread owns the log; a SIGKILL loses at most the
    checkpoints not yet durable, and the resumed run still makes the uninterrupted tokens."""
    want, got, log = tmp_path / "want.npy", tmp_path / "got.npy", tmp_path / "a.clog"
    assert decode("--out", str(want)).returncode == 0
    r = decode("--log", str(log), "--every", "1", "--async", "--backend", "reference",
               "--kv-scan", kv_scan, "--crash-after", "25")
    assert r.returncode == -9, r.stderr
    r = decode("--log", str(log), "--resume", "--restore-backend", "reference", "--out", str(got))
    assert r.returncode == 0, r.stderr
    restored_at = int(r.stdout.split("resumed at position ")[1].split()[0])
    assert 6 + 3 <= restored_at < 6 + 40
    assert np.array_equal(np.load(want), np.load(got))


@pytest.mark.parametrize("kv_scan", ["host", "device"])
def test_a_serving_loop_of_rounds_resumes_in_the_right_round(tmp_path, kv_scan):
    """--rounds: each slot takes the next request when one ends, in the same blocks (KV rows
    overwritten, positions from 0 again). Killed in the third round, the resumed run restores
    the round and its position and ends with the uninterrupted run's last tokens."""
    want, got, log = tmp_path / "want.npy", tmp_path / "got.npy", tmp_path / "r.clog"
    rounds = ["--rounds", "3", "--tokens", "12"]
    assert decode(*rounds, "--out", str(want)).returncode == 0
    r = decode(*rounds, "--log", str(log), "--every", "1", "--async", "--backend", "reference",
               "--kv-scan", kv_scan, "--crash-after", "30")
    assert r.returncode == -9, r.stderr
    r = decode(*rounds, "--log", str(log), "--resume", "--restore-backend", "reference",
               "--out", str(got))
    assert r.returncode == 0, r.stderr
    assert " of round 2 " in r.stdout, r.stdout
    restored_at = int(r.stdout.split("resumed at position ")[1].split()[0])
    assert 6 <= restored_at < 6 + 12
    a, b = np.load(want), np.load(got)
    assert len(set(a[:, 6:].ravel().tolist())) > 10
    assert np.array_equal(a, b)


@pytest.mark.skipif(not backend_status()["cuda"].ok or not torch.cuda.is_available(),
                    reason="needs a CUDA device and torch with CUDA")
def test_async_checkpoints_on_cuda_graph_decode_crash_restore_continue(tmp_path):
    """The GPU form: the step replayed from a CUDA graph, each checkpoint's device work one
    graph replay in the decode stream (KV pages from the block table, adapter and scheduler
    by device scan); killed, restored on cuda, the tokens are the uninterrupted run's."""
    gpu = [a if a != "cpu" else "cuda" for a in COMMON]
    run = lambda *extra: subprocess.run([sys.executable, SCRIPT, *gpu, *extra],  # noqa: E731
                                        capture_output=True, text=True, timeout=300)
    want, got, log = tmp_path / "want.npy", tmp_path / "got.npy", tmp_path / "g.clog"
    assert run("--out", str(want)).returncode == 0
    r = run("--log", str(log), "--every", "1", "--async", "--backend", "cuda", "--crash-after", "25")
    assert r.returncode == -9, r.stderr
    r = run("--log", str(log), "--resume", "--restore-backend", "cuda", "--out", str(got))
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(want), np.load(got))


@pytest.mark.skipif(not backend_status()["cuda"].ok or not torch.cuda.is_available(),
                    reason="needs a CUDA device and torch with CUDA")
def test_ring_gathered_checkpoints_of_a_real_size_decode_resume_exactly(tmp_path):
    """--device-side ring on the 0.6B config (2 KiB KV rows: one a page), two rounds: the KV
    pages gathered by the persistent kernel beside the next step; killed in the second round,
    restored on cuda, the tokens are the uninterrupted run's."""
    args = [sys.executable, SCRIPT, "--config", "qwen3-0.6b", "--device", "cuda", "--batch", "4",
            "--prompt", "6", "--tokens", "20", "--rounds", "2"]
    env = {**os.environ, "CUDA_MODULE_LOADING": "EAGER"}   # what ring_gather needs
    run = lambda *extra: subprocess.run([*args, *extra], capture_output=True, text=True,  # noqa: E731
                                        timeout=300, env=env)
    want, got, log = tmp_path / "want.npy", tmp_path / "got.npy", tmp_path / "g.clog"
    assert run("--out", str(want)).returncode == 0
    r = run("--log", str(log), "--every", "1", "--async", "--backend", "cuda", "--device-side",
            "ring", "--when-full", "coalesce", "--crash-after", "30")
    assert r.returncode == -9, r.stderr
    r = run("--log", str(log), "--resume", "--restore-backend", "cuda", "--out", str(got))
    assert r.returncode == 0, r.stderr
    assert " of round 1 " in r.stdout, r.stdout
    assert np.array_equal(np.load(want), np.load(got))


def test_restore_is_what_carries_the_state(tmp_path):
    """The same resume with the KV cache wiped after restoring continues differently: the
    equality above is the restored state's doing, not the model's."""
    from concordia import llm as L
    log = tmp_path / "r.clog"
    r = decode("--log", str(log), "--every", "4", "--backend", "reference", "--crash-after", "20")
    assert r.returncode == -9
    args = L.parse_args([*COMMON, "--log", str(log), "--resume"])
    run = L.DecodeRun(args)
    rec = run.resume("reference")
    intact = run.generate(start_pos=rec["restored_pos"])
    run = L.DecodeRun(args)
    rec = run.resume("reference")
    run.model.kv.zero_()
    wiped = run.generate(start_pos=rec["restored_pos"])
    assert not np.array_equal(intact, wiped)


def test_kv_block_scanner_lists_the_pages_of_written_slots():
    # 2 layers x K/V x 4 blocks x 8 slots x 64 B per slot = 8 KiB: 2 pages of 4 KiB, a slot's
    # pages by hand: slot index ((l*2 + kv)*4 + block)*8 + slot, 64 B each
    s = KVBlockScanner((2, 2, 4, 8, 2, 8), itemsize=4, page_size=1024)
    s.mark(blocks=[1], slots=[3])
    starts = [(((l * 2 + kv) * 4 + 1) * 8 + 3) * 64 for l in range(2) for kv in range(2)]
    assert s.dirty_pages().tolist() == sorted({x // 1024 for x in starts})
    s.committed()
    assert s.dirty_pages().size == 0
    big = KVBlockScanner((1, 2, 2, 2, 1, 1024), itemsize=4, page_size=1024)   # 4 KiB slots
    big.mark(blocks=[1], slots=[0])
    assert big.dirty_pages().tolist() == [8, 9, 10, 11, 24, 25, 26, 27]


def test_checkpoints_log_only_what_changed(tmp_path):
    import json
    log, js = tmp_path / "c.clog", tmp_path / "c.json"
    r = decode("--log", str(log), "--every", "1", "--backend", "reference", "--json", str(js))
    assert r.returncode == 0, r.stderr
    ck = json.load(open(js))["checkpoints"]
    full, deltas = ck[0], ck[1:]
    assert full["full"] and not any(c["full"] for c in deltas)
    # a step writes one slot per sequence per layer per K/V (3 x 2 x 2 = 12 slots of 128 B,
    # in pages of 256 B): at most 12 KV pages, plus the scheduler's header page and a page
    # per sequence's new token, and on adapter steps the pages of 2 rows of 2 factors
    assert max(c["pages"] for c in deltas) <= 12 + 1 + 3 + 4
    # the base image leaves out pages of zeros: the KV cache and adapter are empty before the
    # first step, and only the scheduler's pages (prompts, lengths) hold anything
    assert full["pages"] <= 2, full


def test_bad_arguments_are_one_line():
    r = decode("--resume")
    assert r.returncode == 2 and "--resume needs --log" in r.stderr and "Traceback" not in r.stderr
    for bad, says in ((["--page-size", "1000"], "--page-size must be a power of two >= 256"),
                      (["--rounds", "0"], "--rounds and --slot-mb must be >= 1"),
                      (["--slot-mb", "0"], "--rounds and --slot-mb must be >= 1"),
                      (["--every", "-1"], "--every must be >= 0"),
                      (["--ahead", "9"], "--ahead must be 0 to 8")):
        r = decode(*bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("side", ["ring", "fork"])
def test_a_device_side_where_it_cannot_run_is_one_line(tmp_path, side):
    """--device-side ring or fork on a backend without streams: the reason, in one line."""
    r = decode("--device-side", side, "--async", "--log", str(tmp_path / "r.clog"),
               "--backend", "reference")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"device_side='{side}' needs a backend with streams" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_kept_model_checkpoints_on_and_off_and_each_log_resumes(tmp_path):
    """bench/llm.py keeps one model for every kind of run (models made one after another ran
    12 % apart on an H100): a Checkpointer opened and closed on a kept run leaves its tokens
    as they were, and each log it wrote resumes, in a new run, to the same tokens."""
    from concordia import llm as L
    args = L.parse_args([*COMMON, "--backend", "reference"])
    run = L.DecodeRun(args)
    want = run.generate()
    for i, asynchronous in enumerate((True, False)):
        args.log, args.async_checkpoints = str(tmp_path / f"k{i}.clog"), asynchronous
        run.open_checkpointer()
        run.generate(stop_after=17)
        assert len(run.stats) >= 17          # this log's checkpoints only: a base image and each step
        run.close_checkpointer()
        assert run.ckpt is None and run.scanner is None
        again = L.DecodeRun(L.parse_args([*COMMON, "--log", args.log, "--resume"]))
        rec = again.resume("reference")
        assert 6 + 10 <= rec["restored_pos"] < 6 + 40
        assert np.array_equal(again.generate(start_pos=rec["restored_pos"]), want)
    args.log, args.async_checkpoints = None, False
    assert np.array_equal(run.generate(), want)   # decoding on without one


def test_the_decode_benchmark_runs_its_kinds_on_one_model(tmp_path):
    """bench/llm.py at the tiny size on the CPU box: every kind's rate, the async kind's figures
    and recovery, from one process."""
    import json
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(SCRIPT), "..", "bench",
                                                       "llm.py"),
                          "--config", "tiny", "--device", "cpu", "--batches", "2", "--tokens", "24",
                          "--repeats", "2", "--kinds", "plain,async,sync", "--name",
                          f"test-llm-{os.getpid()}"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    path = out.stderr.split("wrote ")[1].split()[0]   # write_result says where, on stderr
    try:
        row = json.load(open(path))["rows"][0]
    finally:
        for p in (path, path[:-5] + ".png"):
            if os.path.exists(p):
                os.remove(p)
    assert row["batch"] == 2 and all(len(row[f"tok_s_{k}_runs"]) == 2 for k in ("plain", "async", "sync"))
    assert min(row["tok_s_plain_runs"] + row["tok_s_async_runs"]) > 0
    assert row["bytes_per_step"] > 0 and row["lag_checkpoints_median"] >= 0
    assert row["recovery_ms"]["total"] > 0 and row["ckpt_ms_median"] > 0
    for k in ("async", "sync"):   # each repeat's own pair, against that repeat's plain run
        plain, runs = row["tok_s_plain_runs"], row[f"tok_s_{k}_runs"]
        assert row[f"overhead_pct_{k}_repeats"] == pytest.approx(
            [100 * (p - r) / p for p, r in zip(plain, runs)], abs=0.2)


@pytest.mark.parametrize("args,says", [
    (["--runs", "P,X"], "--runs takes P, A, N and F"),
    (["--tokens", "8"], "--tokens >= 24"),
    (["--switch-interval", "0"], "--switch-interval is seconds in (0, 1]"),
] + ([(["--runs", "P,A"], "needs a CUDA device")] if not torch.cuda.is_available() else []))
def test_the_timeline_benchmark_refuses_in_one_line(args, says):
    assert says in usage_error("decode_timeline.py", *args)


@pytest.mark.parametrize("asynchronous,ahead", [(True, 1), (True, 2), (False, 1)])
def test_the_next_step_is_enqueued_before_the_host_waits_for_tokens(tmp_path, monkeypatch,
                                                                    asynchronous, ahead):
    """The decode loop keeps `ahead` steps enqueued past the one whose tokens the host waits
    for (checkpoint_async, or none), one step at a time around synchronous checkpoints; the
    steps' own writes into the device state agree with the host's mirror of them."""
    from concordia import llm as L
    events = []
    launch, read_back = L.Qwen3Decoder.launch, L.Qwen3Decoder.read_back

    def logged_launch(model):
        events.append("launch")
        return launch(model)

    def logged_read_back(model, out):
        wait = read_back(model, out)
        return lambda: (events.append("wait"), wait())[1]
    monkeypatch.setattr(L.Qwen3Decoder, "launch", logged_launch)
    monkeypatch.setattr(L.Qwen3Decoder, "read_back", logged_read_back)
    args = L.parse_args([*COMMON, "--tokens", "6", "--ahead", str(ahead), "--backend", "reference",
                         "--log", str(tmp_path / "o.clog"), *(["--async"] if asynchronous else [])])
    run = L.DecodeRun(args)
    run.open_checkpointer()
    tokens = run.generate()
    run.close_checkpointer()
    steps = 6 + 6 - 1
    lead = ahead if asynchronous else 0
    want = ["launch"] * (lead + 1)
    for _ in range(steps - lead - 1):
        want += ["wait", "launch"]
    want += ["wait"] * (lead + 1)
    assert events == want
    # the device state holds each step's input (kv_len = the last step's position); the
    # host's mirror holds the last step's output too
    s = run.sched
    state = s.state.cpu().numpy()
    assert (state[0], state[1], s.host[0], s.host[1]) == (steps - 1, steps, steps, steps + 1)
    np.testing.assert_array_equal(state[s.decided], s.host[s.decided])
    np.testing.assert_array_equal(s.tokens_dev.cpu().numpy()[:, :steps], s.tokens()[:, :steps])
    assert np.array_equal(tokens, s.tokens())


def test_a_finished_jobs_last_checkpoint_resumes_with_a_token_to_make(tmp_path):
    """A checkpoint behind step pos holds kv_len = pos and the tokens up to pos: a run
    resumed from it recomputes that step. So a job whose last checkpoint came after its last
    step (killed before its result was delivered) resumes with a token to make, the last
    one, and the same tokens (a standby's recovery waits for that first token)."""
    from concordia import llm as L
    args = L.parse_args([*COMMON, "--tokens", "8", "--backend", "reference", "--async",
                         "--log", str(tmp_path / "f.clog")])
    run = L.DecodeRun(args)
    run.open_checkpointer()
    want = run.generate()
    run.close_checkpointer()
    again = L.DecodeRun(L.parse_args([*COMMON, "--tokens", "8", "--log", args.log, "--resume"]))
    rec = again.resume("reference")
    assert rec["restored_pos"] == 6 + 8 - 2          # the last step's position
    made = []
    assert np.array_equal(again.generate(start_pos=rec["restored_pos"], on_token=made.append), want)
    assert made == [6 + 8 - 1]

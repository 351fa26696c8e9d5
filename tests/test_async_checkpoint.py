"""Asynchronous checkpoints: every one restores to the state it captured, on every backend
present; the ring applies backpressure or coalesces; a writer error surfaces on the next call;
ready checkpoints share an fsync; a SIGKILL never loses a checkpoint reported durable; on cuda
the capture is ordered in the caller's stream (a write enqueued after it is not in it). The
stream path (ring slots, page lists, graphs, release) also runs on the CPU box, on the
reference interpreter given in-order streams (InOrderStreams)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from concordia import ConcordiaError, Ptr, Runtime, f32, global_id, i32, kernel
from concordia.backends import backend_status
from concordia.handlers import Checkpointer, scan_log
from concordia.handlers.scanners import KVBlockScanner, SequenceCacheScanner
from tests.stream_backend import stream_runtime

BACKENDS = [n for n in ("reference", "opencl", "cuda", "tenstorrent") if backend_status()[n].ok]
N = 1 << 14


@kernel
def bump(x: Ptr[f32], stride: i32, n: i32):
    i = global_id(0) * stride
    if i < n:
        x[i] = x[i] + 1.0


def restored(path, checkpoint=None):
    return Checkpointer.restore(str(path), Runtime("reference"), checkpoint=checkpoint)


@pytest.mark.parametrize("backend", BACKENDS + ["reference-streams"])
def test_each_async_checkpoint_restores_the_state_it_captured(tmp_path, backend):
    rt = _runtime(backend)
    kv = rt.to_device(np.arange(N, dtype=np.float32))
    path = tmp_path / "a.clog"
    ck = Checkpointer(rt, {"kv": kv}, str(path))
    states, handles = [], []
    for s in range(8):
        if s:
            rt.launch(bump, global_size=8, local_size=8, args=(kv, 700 * s + 1, N))
        handles.append(ck.checkpoint_async())
        states.append(kv.numpy())
    assert ck.flush() == handles[-1].id == ck.durable_id == 8
    stats = [h.result(timeout=30) for h in handles]
    assert stats[0].full and not any(s.full for s in stats[1:])
    assert all(0 < s.pages < N * 4 // 4096 for s in stats[1:])
    ck.close()
    for k, want in enumerate(states, start=1):
        np.testing.assert_array_equal(restored(path, checkpoint=k)["kv"].numpy(), want)


def test_a_host_scanner_region_and_a_shadow_region_together(tmp_path):
    rt = Runtime("reference")
    shape = (2, 2, 4, 16, 2, 64)   # layers, K/V, blocks, block_size, kv_heads, head_dim
    kv_host = np.zeros(int(np.prod(shape)), np.float32)
    kv = rt.to_device(kv_host)
    other = rt.to_device(np.zeros(4096, np.float32))
    scanner = KVBlockScanner(shape, 4)
    ck = Checkpointer(rt, {"kv": kv, "other": other}, str(tmp_path / "s.clog"),
                      scanners={"kv": scanner})
    ck.checkpoint_async()
    view = kv_host.reshape(shape)
    for pos in range(20):
        view[:, :, pos // 16 % 4, pos % 16] = pos + 1
        kv.write(kv_host)
        scanner.mark([pos // 16 % 4], [pos % 16])
        other.write(np.full(4096, pos, np.float32))
        ck.checkpoint_async()
    ck.close()
    back = restored(tmp_path / "s.clog")
    np.testing.assert_array_equal(back["kv"].numpy(), kv_host)
    np.testing.assert_array_equal(back["other"].numpy(), np.full(4096, 19, np.float32))


def slow_sync(ck, seconds, counter=None):
    """Make the writer's fsync slow (and count the group commits)."""
    real = ck.log.sync

    def sync():
        if counter is not None:
            counter.append(1)
        time.sleep(seconds)
        real()
    ck.log.sync = sync


@pytest.mark.parametrize("backend", ["reference", "reference-streams"])
def test_a_full_ring_makes_the_caller_wait(tmp_path, backend):
    rt = _runtime(backend)
    kv = rt.to_device(np.zeros(N, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "w.clog"), ring_slots=1)
    ck.checkpoint_async()
    slow_sync(ck, 0.2)
    t = time.perf_counter()
    for s in range(4):
        kv.write(np.full(N, s, np.float32))
        ck.checkpoint_async()
    # the slot frees once the writer has logged its pages: the third and fourth each waited
    # for a 0.2 s group commit to end
    assert time.perf_counter() - t > 0.35
    ck.close()
    np.testing.assert_array_equal(restored(tmp_path / "w.clog")["kv"].numpy(), np.full(N, 3, np.float32))


def slow_append(ck, seconds):
    """Make the writer slow to take a slot's pages (the slot frees only after): its appends
    of pieces (append_many) and of a stream capture's arrays (append_scatters) alike."""
    for name in ("append_many", "append_scatters"):
        real = getattr(ck.log, name)

        def slow(*a, _real=real, **k):
            time.sleep(seconds)
            return _real(*a, **k)
        setattr(ck.log, name, slow)


@pytest.mark.parametrize("backend", ["reference", "reference-streams"])
def test_a_full_ring_coalesces_into_the_next_checkpoint(tmp_path, backend):
    rt = _runtime(backend)
    kv = rt.to_device(np.zeros(N, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "c.clog"), ring_slots=1, when_full="coalesce")
    ck.checkpoint_async()
    slow_append(ck, 0.3)
    first = ck.checkpoint_async()
    kv.write(np.full(N, 7, np.float32))
    t = time.perf_counter()
    skipped = ck.checkpoint_async()    # the ring is full: no wait, taken by the next one
    assert time.perf_counter() - t < 0.1
    first.result(timeout=10)
    last = ck.checkpoint_async()
    assert skipped.result(timeout=10) == last.result(timeout=10)
    assert skipped.id == last.id
    ck.close()
    np.testing.assert_array_equal(restored(tmp_path / "c.clog")["kv"].numpy(), np.full(N, 7, np.float32))


@pytest.mark.parametrize("backend", ["reference", "reference-streams"])
def test_coalescing_is_bounded_then_the_caller_waits(tmp_path, backend):
    """At most MAX_COALESCE checkpoints in a row are coalesced (a staging slot holds a bounded
    number of steps' pages: unbounded coalescing overflowed it at batch 8 on the H100); the
    next one waits for a slot, and the log ends with everything."""
    from concordia.handlers.async_checkpoint import MAX_COALESCE
    rt = _runtime(backend)
    kv = rt.to_device(np.zeros(N, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "b.clog"), ring_slots=1, when_full="coalesce")
    ck.checkpoint_async()
    slow_append(ck, 0.4)
    ck.checkpoint_async()                 # takes the one slot; the writer is slow
    for k in range(MAX_COALESCE):
        kv.write(np.full(N, k + 1, np.float32))
        t = time.perf_counter()
        ck.checkpoint_async()             # coalesced: no wait
        assert time.perf_counter() - t < 0.1
    kv.write(np.full(N, 9, np.float32))
    t = time.perf_counter()
    last = ck.checkpoint_async()          # one more: it waits for the slot
    assert time.perf_counter() - t > 0.2
    last.result(timeout=30)
    ck.close()
    np.testing.assert_array_equal(restored(tmp_path / "b.clog")["kv"].numpy(), np.full(N, 9, np.float32))


def test_ready_checkpoints_share_one_fsync(tmp_path):
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(N, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "g.clog"), ring_slots=16)
    ck.checkpoint_async()
    syncs = []
    slow_sync(ck, 0.05, syncs)
    handles = []
    for s in range(12):
        kv.write(np.full(N, s, np.float32))
        handles.append(ck.checkpoint_async())
    ck.flush()
    assert len(syncs) < len(handles)
    assert max(h.lag_checkpoints for h in handles) >= 1
    ck.close()
    assert scan_log(str(tmp_path / "g.clog")).last_checkpoint == 13


@pytest.mark.parametrize("backend", ["reference", "reference-streams"])
def test_a_writer_error_surfaces_on_the_next_call_and_the_next_checkpoint_is_full(tmp_path, backend):
    rt = _runtime(backend)
    kv = rt.to_device(np.zeros(N, np.float32))
    path = tmp_path / "e.clog"
    ck = Checkpointer(rt, {"kv": kv}, str(path))
    ck.checkpoint_async()
    real = ck.log.append_many, ck.log.append_scatters

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    ck.log.append_many = ck.log.append_scatters = broken
    kv.write(np.ones(N, np.float32))
    h = ck.checkpoint_async()
    with pytest.raises(ConcordiaError, match="not written: .*No space left"):
        h.result(timeout=10)
    with pytest.raises(ConcordiaError, match="^the checkpoint writer failed: .*No space left on device$"):
        ck.checkpoint_async()
    ck.log.append_many, ck.log.append_scatters = real
    again = ck.checkpoint_async()
    assert again.result(timeout=10).full
    ck.close()
    np.testing.assert_array_equal(restored(path)["kv"].numpy(), np.ones(N, np.float32))


@pytest.mark.parametrize("backend", ["reference", "reference-streams"])
def test_the_first_async_checkpoint_reads_its_base_at_the_call_and_the_writer_writes_it(
        tmp_path, backend, monkeypatch):
    """A base image read whole (here: hash mode) is read by the first checkpoint_async and
    appended and committed by the writer: it holds the state as of the call though the
    caller writes right after; a writer error in it surfaces on the next call, whose base is
    whole again; a base over ASYNC_BASE_BYTES is written before the call returns."""
    from concordia.handlers import checkpointer as C
    rt = _runtime(backend)
    first = np.arange(N, dtype=np.float32)
    kv = rt.to_device(first)
    path = tmp_path / "b.clog"
    ck = Checkpointer(rt, {"kv": kv}, str(path), mode="hash")
    real = ck.log.append_base

    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    ck.log.append_base = broken
    h = ck.checkpoint_async()
    with pytest.raises(ConcordiaError, match="not written: .*No space left"):
        h.result(timeout=10)
    with pytest.raises(ConcordiaError, match="^the checkpoint writer failed: .*No space left on device$"):
        ck.checkpoint_async()
    ck.log.append_base = real
    base = ck.checkpoint_async()
    kv.write(first * 2)                              # the caller goes on writing
    assert base.result(timeout=10).full and base.result().pages == N * 4 // 4096
    delta = ck.checkpoint_async()
    assert not delta.result(timeout=10).full
    ck.close()
    commits = [json.loads(r.payload) for r in scan_log(str(path)).records if r.kind == 3]
    assert [c["full"] for c in commits] == [True, False] and commits[0]["async"]
    np.testing.assert_array_equal(restored(path, checkpoint=base.id)["kv"].numpy(), first)
    np.testing.assert_array_equal(restored(path)["kv"].numpy(), first * 2)
    monkeypatch.setattr(C, "ASYNC_BASE_BYTES", 4096)   # this base is larger: written at once
    os.remove(path)
    ck = Checkpointer(rt, {"kv": kv}, str(path), mode="hash")
    plans = []
    real_init = C._WholeReads.__init__
    monkeypatch.setattr(C._WholeReads, "__init__",
                        lambda self, *a: (plans.append(1), real_init(self, *a))[1])
    now = ck.checkpoint_async()
    assert now.done() and now.result().full
    assert len(plans) == 1   # its reads planned once, for the test and the write alike
    ck.close()
    np.testing.assert_array_equal(restored(path)["kv"].numpy(), first * 2)


CHILD = r"""
import sys, numpy as np
from concordia import Runtime
from concordia.handlers import Checkpointer
from tests.stream_backend import stream_runtime
rt = stream_runtime() if sys.argv[2] == "reference-streams" else Runtime("reference")
kv = rt.to_device(np.zeros(1 << 14, np.float32))
ck = Checkpointer(rt, {"kv": kv}, sys.argv[1])
for k in range(1, 100000):
    kv.write(np.full(1 << 14, k, np.float32))
    ck.checkpoint_async()
    if k % 7 == 0:
        print(ck.durable_id, flush=True)
"""


# CONCORDIA_ASYNC_KILLS=200 for the long run (about 1.5 s each)
@pytest.mark.parametrize("backend", ["reference", "reference-streams"])
@pytest.mark.parametrize("seed", range(int(os.environ.get("CONCORDIA_ASYNC_KILLS", "5"))))
def test_sigkill_never_loses_a_checkpoint_reported_durable(tmp_path, seed, backend):
    path = tmp_path / "k.clog"
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), backend], cwd=root,
                             stdout=subprocess.PIPE, text=True)
    reported = []
    reader = threading.Thread(target=lambda: reported.extend(int(x) for x in child.stdout))
    reader.start()
    start = time.monotonic()   # the kill lands after the child's first report (its imports
    while not reported and child.poll() is None and time.monotonic() - start < 120:   # vary)
        time.sleep(0.01)
    time.sleep((seed * 7919 % 997) / 997)   # spread over a second of checkpoints
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join()
    assert reported, "the child reported nothing before it was killed"
    scan = scan_log(str(path))
    assert scan.last_checkpoint >= reported[-1]
    # checkpoint k holds the value k everywhere
    back = restored(path)["kv"].numpy()
    assert (back == back[0]).all() and back[0] == scan.last_checkpoint


needs_cuda = pytest.mark.skipif(not backend_status()["cuda"].ok, reason="no CUDA device here")


def _runtime(backend: str) -> Runtime:
    """A Runtime; "reference-streams": the reference interpreter as InOrderStreams."""
    return stream_runtime() if backend == "reference-streams" else Runtime(backend)


def test_the_stream_path_restores_each_capture_and_gives_its_ring_back(tmp_path, monkeypatch):
    """The Hugging Face guard's layout (two same-shaped caches sharing one host list, and a
    shadow-scanned region) through the stream path: every checkpoint restores exactly, a
    second slot is made only because the writer holds the first, and close gives back every
    graph it made."""
    import concordia.handlers.async_checkpoint as ac
    monkeypatch.setattr(ac, "HOLD_S", 30.0)  # each capture held until the next: a second slot
    rt = _runtime("reference-streams")
    shape = (1, 2, 32, 64)                   # batch, heads, positions, head_dim: 256 B rows
    k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    kb, vb, tb = (rt.to_device(a.reshape(-1)) for a in (k, v, np.zeros(64, np.float32)))
    scanner = SequenceCacheScanner(shape, 4, 256, users=2)
    ck = Checkpointer(rt, {"k": kb, "v": vb, "t": tb}, str(tmp_path / "s.clog"), page_size=256,
                      scanners={"k": scanner, "v": scanner}, ring_slots=3)
    ck.checkpoint_async()                    # the base image, at once
    want, handles = [], []
    for pos in range(12):
        k[:, :, pos] = pos + 1.0
        v[:, :, pos] = -pos - 1.0
        kb.write(k.reshape(-1))
        vb.write(v.reshape(-1))
        tb.write(np.full(64, pos, np.float32))
        scanner.mark(pos, pos)
        handles.append(ck.checkpoint_async())
        want.append((k.copy(), v.copy(), np.full(64, pos, np.float32)))
    ck.flush()
    writer = ck._writer
    made = len(writer.ring)
    assert 2 <= made <= 3
    # 2 rows in k and 2 in v a step, and t's page once it changes (it starts at zeros)
    assert [h.result().pages for h in handles] == [4] + [5] * 11
    ck.close()
    assert rt.backend.graphs_destroyed == rt.backend.graphs_made == made
    assert writer.ring == []
    for n, (wk, wv, wt) in enumerate(want, start=2):
        got = restored(tmp_path / "s.clog", checkpoint=n)
        np.testing.assert_array_equal(got["k"].numpy(), wk.reshape(-1))
        np.testing.assert_array_equal(got["v"].numpy(), wv.reshape(-1))
        np.testing.assert_array_equal(got["t"].numpy(), wt)


def test_a_forked_capture_scans_a_shadow_region_from_its_copy_and_restores_each_step(tmp_path):
    """device_side="fork" on the stream path (InOrderStreams): a shadow-scanned region is
    copied into the slot at the capture and scanned and gathered from that copy by the side
    graph; each checkpoint restores exactly, only its changed pages are logged, and close
    gives back both graphs of every slot. (Whether the copy holds the state of the capture
    point while the stream goes on is the cuda test's: this backend completes work as it is
    enqueued.)"""
    rt = _runtime("reference-streams")
    x = rt.to_device(np.zeros(N, np.float32))
    ck = Checkpointer(rt, {"x": x}, str(tmp_path / "f.clog"), device_side="fork", ring_slots=2)
    ck.checkpoint_async()                    # the base image
    want, handles, host = [], [], np.zeros(N, np.float32)
    for s in range(1, 7):
        host[(s * 3001) % N] = s             # one page a step
        x.write(host)
        handles.append(ck.checkpoint_async())
        want.append(host.copy())
    ck.flush()
    writer = ck._writer
    assert writer.staging.snapshots == {0} and all(s.side is not None for s in writer.ring)
    assert [h.result().pages for h in handles] == [1] * 6
    made = len(writer.ring)
    ck.close()
    assert rt.backend.graphs_destroyed == rt.backend.graphs_made == 2 * made
    for k, w in enumerate(want, start=2):
        np.testing.assert_array_equal(restored(tmp_path / "f.clog", checkpoint=k)["x"].numpy(), w)


@needs_cuda
def test_cuda_capture_is_ordered_in_the_callers_stream(tmp_path):
    torch = pytest.importorskip("torch")
    rt = Runtime("cuda")
    stream = torch.cuda.Stream()
    n = 1 << 20
    x = torch.zeros(n, dtype=torch.bfloat16, device="cuda")   # 2 MiB, 512 pages
    busy = torch.randn(4096, 4096, device="cuda")
    ck = Checkpointer(rt, {"x": rt.from_dlpack(x)}, str(tmp_path / "g.clog"))
    ck.checkpoint_async(stream)
    mirror, expected = np.zeros(n, np.float32), []
    with torch.cuda.stream(stream):
        for s in range(1, 6):
            for _ in range(3):
                busy @ busy          # the GPU is busy: what follows waits in the stream
            lo = (s * 4099) % (n - 3000)
            x[lo:lo + 3000] += s     # dirties a few pages
            mirror[lo:lo + 3000] += s
            expected.append(mirror.copy())
            ck.checkpoint_async(stream)
            x.mul_(3).add_(1)        # enqueued after the capture: not in it
            x.sub_(1).div_(3)        # and back (exact in bf16 for these small integers)
    ck.flush()
    ck.close()
    for k, want in enumerate(expected, start=2):
        got = restored(tmp_path / "g.clog", checkpoint=k)["x"].numpy().view(np.uint16)
        as_f32 = (got.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(as_f32, want)


@needs_cuda
def test_cuda_ring_slots_are_made_as_needed_and_given_back_at_close(tmp_path):
    """A slot is made only when every slot made so far is in flight (a writer that keeps up
    needs one), at most ring_slots; close gives back every slot's pinned and mapped memory,
    however many Checkpointers came and went (a guard a generate call kept them all)."""
    torch = pytest.importorskip("torch")
    rt = Runtime("cuda")
    b = rt.backend
    x = torch.zeros(1 << 16, dtype=torch.float32, device="cuda")
    busy = torch.randn(4096, 4096, device="cuda")
    held = []
    for k in range(3):
        ck = Checkpointer(rt, {"x": rt.from_dlpack(x)}, str(tmp_path / f"r{k}.clog"),
                          ring_slots=3)
        ck.checkpoint_async()   # the base image, at once
        for s in range(4):
            x[s * 1024] += 1
            ck.checkpoint_async().result()   # each durable before the next: one slot serves
        assert len(ck._writer.ring) == 1
        for s in range(6):      # the device is busy: captures stay in flight, the ring fills
            for _ in range(4):
                busy @ busy
            x[s * 1024] += 1
            ck.checkpoint_async()
        assert len(ck._writer.ring) == 3
        ck.close()
        np.testing.assert_array_equal(restored(tmp_path / f"r{k}.clog")["x"].numpy(),
                                      x.cpu().numpy())
        held.append((len(b._mapped), len(b._pinned_blocks)))
    assert held[0] == held[1] == held[2]


@pytest.mark.parametrize("positions", [1, 3])
@pytest.mark.parametrize("head_dim, itemsize, page", [(128, 2, 256), (64, 4, 256), (16, 4, 256),
                                                     (80, 2, 256), (96, 4, 256), (512, 4, 256)])
def test_pages_a_step_is_the_most_a_steps_positions_touch(head_dim, itemsize, page, positions):
    """SequenceCacheScanner.pages_a_step, which sizes the staging, is exact: the most pages
    any `positions_a_step` consecutive positions touch (a row straddles a page only where
    neither size divides the other)."""
    shape = (2, 3, 64, head_dim)
    scanner = SequenceCacheScanner(shape, itemsize, page, positions_a_step=positions)
    most = 0
    for pos in range(64 - positions + 1):
        scanner.mark(pos, pos + positions - 1)
        most = max(most, len(scanner.dirty_pages()))
        scanner.committed()
    assert scanner.pages_a_step == most


@pytest.mark.parametrize("backend", ["reference-streams"] + [b for b in ("cuda",) if b in BACKENDS])
def test_a_host_list_longer_than_its_staging_is_checkpointed_at_once(tmp_path, backend):
    """A host scanner that says how many pages a step touches gets staging for a few steps'
    pages (HOST_LIST_STEPS), not its whole region; a checkpoint that lists more (a long
    pause between checkpoints) is taken at once, and every checkpoint restores exactly."""
    from concordia.handlers.async_checkpoint import HOST_LIST_STEPS
    rt = _runtime(backend)
    shape = (1, 2, 512, 64)                  # batch, heads, positions, head_dim: 256 B rows
    x = np.zeros(shape, np.float32)
    buf = rt.to_device(x.reshape(-1))
    scanner = SequenceCacheScanner(shape, 4, 256)
    ck = Checkpointer(rt, {"x": buf}, str(tmp_path / "h.clog"), page_size=256,
                      scanners={"x": scanner})
    cap = HOST_LIST_STEPS * scanner.pages_a_step
    assert cap < 2 * 512
    ck.checkpoint_async()                    # the base image
    expected, handles = [], []
    for first, last in ((0, 0), (1, 300), (301, 301)):
        x[:, :, first:last + 1] = first + 1.0
        buf.write(x.reshape(-1))
        scanner.mark(first, last)
        handles.append(ck.checkpoint_async())
        expected.append(x.copy())
    assert len(scanner.rows) * 300 > cap
    assert ck._writer.bounded == [(scanner, cap)]
    assert handles[1].done() and handles[1].result().pages == 2 * 300   # taken at once
    ck.flush()
    ck.close()
    for k, want in enumerate(expected, start=2):
        np.testing.assert_array_equal(restored(tmp_path / "h.clog", checkpoint=k)["x"].numpy(),
                                      want.reshape(-1))


def test_background_compaction_keeps_the_log_bounded(tmp_path):
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(N, np.float32))
    path = tmp_path / "b.clog"
    ck = Checkpointer(rt, {"kv": kv}, str(path), compact_at_bytes=200_000)
    sizes = []
    for s in range(60):
        host = np.zeros(N, np.float32)
        host[(s * 1024) % N:(s * 1024) % N + 2048] = s + 1     # two pages a step
        kv.write(host)
        ck.checkpoint_async()
        sizes.append(os.path.getsize(path))
    ck.flush()
    writer = ck._writer
    ck.close()
    assert writer.compactions and max(sizes) < 200_000 + 3 * (N * 4)
    assert not os.path.exists(str(path) + ".retired")   # the old logs are gone by close()
    assert scan_log(str(path)).last_checkpoint == 60
    np.testing.assert_array_equal(restored(path)["kv"].numpy(), host)


def test_block_table_scanner_lists_what_kv_block_scanner_lists():
    from concordia.handlers.scanners import BlockTableScanner
    rt = Runtime("reference")
    shape, batch = (2, 2, 8, 4, 16, 32), 2   # 2 KiB slots, 4 KiB pages; 4 blocks a sequence
    table_host = np.array([[0, 2, 4, 6], [1, 3, 5, 7]], np.int64)
    table, pos = rt.to_device(table_host.reshape(-1)), rt.zeros(1, np.int64)
    device = BlockTableScanner(shape, 4, table, pos, batch)
    host = KVBlockScanner(shape, 4)
    for p in range(16):   # a decode writes every position in turn
        pos.write(np.array([p], np.int64))
        host.mark(table_host[:, p // 4], np.full(batch, p % 4))
        if p in (1, 7, 8, 15):   # lists of 2 positions, 6 (coalesced checkpoints), 1, 7
            np.testing.assert_array_equal(device.dirty_pages(), host.dirty_pages())
            host.committed()


@pytest.mark.parametrize("backend", BACKENDS + ["reference-streams"])
def test_block_table_scanner_on_a_region_smaller_than_a_steps_list(tmp_path, backend):
    """Many list entries share one page (64-byte slots): the slot holds the entries, and the
    log holds each page once (on cuda: the lister in the checkpoint's graph)."""
    from concordia.handlers.scanners import BlockTableScanner
    rt = _runtime(backend)
    shape, batch = (2, 2, 6, 8, 2, 8), 3          # 64-byte slots: a 6 KiB cache, 2 pages
    table_host = np.array([[0, 3], [1, 4], [2, 5]], np.int64)
    cache = np.zeros(int(np.prod(shape)), np.float32)
    kv, table, pos = rt.to_device(cache), rt.to_device(table_host.reshape(-1)), rt.zeros(1, np.int64)
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "t.clog"),
                      scanners={"kv": BlockTableScanner(shape, 4, table, pos, batch)})
    ck.checkpoint_async()
    view = cache.reshape(shape)
    for p in range(16):
        view[:, :, table_host[:, p // 8], p % 8] = p + 1
        kv.write(cache)
        pos.write(np.array([p], np.int64))
        ck.checkpoint_async()
    ck.close()
    np.testing.assert_array_equal(restored(tmp_path / "t.clog")["kv"].numpy(), cache)


def test_device_side_auto_forks_only_a_block_tables_kv_on_a_backend_with_streams(tmp_path):
    """The default: "fork" where the backend has streams and graphs and a region is a block
    table's KV cache with one slot a page (its gather is most of a capture's device time);
    "stream" otherwise. The forked one restores each step exactly, and its ring made all its
    slots at its first capture."""
    from concordia.handlers.scanners import BlockTableScanner
    shape, batch = (2, 2, 4, 4, 2, 32), 2          # 256-byte slots, one a page
    table_host = np.array([[0, 2], [1, 3]], np.int64)
    for backend, with_kv, want in (("reference", True, "stream"), ("reference-streams", False, "stream"),
                                   ("reference-streams", True, "fork")):
        rt = _runtime(backend)
        cache = np.zeros(int(np.prod(shape)), np.float32)
        kv, table, pos = rt.to_device(cache), rt.to_device(table_host.reshape(-1)), rt.zeros(1, np.int64)
        scanners = {"kv": BlockTableScanner(shape, 4, table, pos, batch, page_size=256)} if with_kv else {}
        path = tmp_path / f"{backend}-{with_kv}.clog"
        ck = Checkpointer(rt, {"kv": kv}, str(path), page_size=256, scanners=scanners)
        assert ck.device_side == want, (backend, with_kv)
        ck.checkpoint_async()
        view, states = cache.reshape(shape), []
        for p in range(8):
            view[:, :, table_host[:, p // 4], p % 4] = p + 1
            kv.write(cache)
            pos.write(np.array([p], np.int64))
            ck.checkpoint_async()
            if p == 0 and backend == "reference-streams" and with_kv:
                # a block table's ring makes all its slots at once: none is made mid-run
                assert len(ck._writer.ring) == 4
            states.append(cache.copy())
        ck.close()
        for k, w in enumerate(states, start=2):
            np.testing.assert_array_equal(restored(path, checkpoint=k)["kv"].numpy(), w)


def test_durable_id_counts_a_synchronous_checkpoint_between_async_ones(tmp_path):
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(N, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "m.clog"))
    ck.checkpoint_async()
    kv.write(np.ones(N, np.float32))
    ck.checkpoint_async()
    kv.write(np.full(N, 2, np.float32))
    stats = ck.checkpoint()
    assert ck.durable_id == stats.checkpoint_id == 3 and ck.flush() == 3
    kv.write(np.full(N, 3, np.float32))
    assert ck.checkpoint_async().result(timeout=10).checkpoint_id == 4
    ck.close()
    np.testing.assert_array_equal(restored(tmp_path / "m.clog")["kv"].numpy(), np.full(N, 3, np.float32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(when_full="drop"), "when_full must be one of wait, coalesce, got 'drop'"),
    (dict(ring_slots=0), "the staging ring needs at least 1 slot, got 0"),
])
def test_bad_ring_settings_are_refused_at_construction_in_one_line(tmp_path, kwargs, message):
    rt = Runtime("reference")
    with pytest.raises(ConcordiaError) as e:
        Checkpointer(rt, {"kv": rt.zeros(N, np.float32)}, str(tmp_path / "x.clog"), **kwargs)
    assert str(e.value) == message
    assert not (tmp_path / "x.clog").exists()   # refused before anything was created


def test_compaction_beside_the_appends_keeps_every_commit(tmp_path, monkeypatch):
    """A BackgroundCompaction folds the durable prefix while checkpoints go on into the old
    file; its thread copies them over in rounds (a tiny catch-up bound forces them) and finish()
    copies the rest and swaps: the new log holds every commit, restores to the last state and
    takes appends; abandoning one instead leaves the old log whole and no stray file."""
    from concordia.handlers import compaction as hc
    from concordia.handlers.log import COMMIT
    monkeypatch.setattr(hc, "CATCH_UP_BYTES", 1)
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(N, np.float32))
    path = str(tmp_path / "c.clog")
    ck = Checkpointer(rt, {"kv": kv}, path)
    host = np.zeros(N, np.float32)

    def steps(first, end):
        for s in range(first, end):
            host[(s * 1024) % N] = s + 1
            kv.write(host)
            ck.checkpoint()
    steps(0, 30)
    job = hc.BackgroundCompaction(ck.log)
    steps(30, 60)                       # appends go on while it runs
    assert job.done.wait(60) and job.error is None
    open(path + ".retired", "wb").write(b"left by a crash")   # removed by the swap
    ck.log = job.finish()
    assert job.swap_parts["tail_bytes"] >= 0 and job.reaper is not None
    job.reaper.join()                   # the old log, freed beside the appends
    assert not os.path.exists(path + ".retired")
    steps(60, 65)                       # the new file takes appends
    ck.close()
    scan = scan_log(path)
    assert scan.problem is None and scan.last_checkpoint == ck.checkpoint_id == 65
    commits = [r for r in scan.records if r.kind == COMMIT]
    assert json.loads(commits[0].payload)["compacted"] and commits[0].page == 30   # the prefix
    assert [r.page for r in commits[1:]] == list(range(31, 66))   # then each one, re-chained
    np.testing.assert_array_equal(restored(path)["kv"].numpy(), host)
    assert not os.path.exists(path + ".compacting")
    ck = Checkpointer(rt, {"kv": kv}, path)
    job = hc.BackgroundCompaction(ck.log)
    assert job.done.wait(60)
    job.abandon()
    steps(65, 67)
    ck.close()
    assert not os.path.exists(path + ".compacting")
    np.testing.assert_array_equal(restored(path)["kv"].numpy(), host)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_counted_gather_strides_over_a_list_longer_than_its_grid(backend):
    """Three groups take seven listed pages (and leave the staging past the count alone)."""
    from concordia.handlers import kernels as hk
    rt = Runtime(backend)
    wpp, n_pages = 64, 12
    src = np.arange(wpp * n_pages, dtype=np.uint32)
    listed = np.array([9, 2, 11, 0, 5, 7, 3, 1], np.int32)   # the count says 7: the last is not
    cur, pages, count = rt.to_device(src), rt.to_device(listed), rt.to_device(np.array([7], np.int32))
    staging = rt.to_device(np.full(8 * wpp, 0xDEAD, np.uint32))
    shadow = rt.to_device(np.zeros_like(src))
    gather = hk.counted_page_gatherer(wpp, src.size)
    rt.launch(gather, global_size=3 * hk.GROUP, local_size=hk.GROUP,
              args=(cur, shadow, pages, count, staging, np.int32(1)))
    got = staging.numpy().reshape(8, wpp)
    np.testing.assert_array_equal(got[:7], src.reshape(n_pages, wpp)[listed[:7]])
    assert (got[7] == 0xDEAD).all()
    sh = shadow.numpy().reshape(n_pages, wpp)   # update_shadow: the gathered pages, only those
    np.testing.assert_array_equal(sh[listed[:7]], src.reshape(n_pages, wpp)[listed[:7]])
    assert not sh[[4, 6, 8, 10]].any()


@needs_cuda
@pytest.mark.parametrize("device_side", ["ring", "fork"])
def test_a_gather_beside_the_stream_holds_each_step_while_the_stream_writes_the_next(tmp_path,
                                                                                    device_side):
    """device_side="ring": the KV pages are gathered by the persistent kernel, started by a
    trigger in the stream; "fork": by a graph on the backend's side stream, after an event in
    the caller's. Either way the stream goes on meanwhile (a busy matmul, then the next
    position's rows). Every checkpoint restores to the cache as of its step, in two rounds
    of positions."""
    if device_side == "ring" and os.environ.get("CUDA_MODULE_LOADING", "").upper() != "EAGER":
        pytest.skip("device_side='ring' needs CUDA_MODULE_LOADING=EAGER in this process")
    torch = pytest.importorskip("torch")
    from concordia.handlers.scanners import BlockTableScanner
    rt = Runtime("cuda")
    stream = torch.cuda.Stream()
    shape, batch, max_blocks = (3, 2, 8, 4, 64), 2, 4    # 256-byte rows: one a page
    kv = torch.zeros(shape, dtype=torch.float32, device="cuda")
    table = torch.tensor([[0, 2, 4, 6], [1, 3, 5, 7]], dtype=torch.int64, device="cuda")
    pos = torch.zeros(1, dtype=torch.int64, device="cuda")
    scanner = BlockTableScanner(shape, 4, rt.from_dlpack(table.view(-1)), rt.from_dlpack(pos),
                                batch, page_size=256)
    # a region scanned against its shadow, written in the stream right after each capture
    # ("fork" scans it on the side stream, from a copy made at the capture point)
    ad = torch.zeros(1024, dtype=torch.float32, device="cuda")
    ck = Checkpointer(rt, {"kv": rt.from_dlpack(kv), "ad": rt.from_dlpack(ad)},
                      str(tmp_path / "r.clog"), page_size=256, scanners={"kv": scanner},
                      device_side=device_side, when_full="coalesce")
    busy = torch.randn(2048, 2048, device="cuda")
    with torch.cuda.stream(stream):   # every kernel once before the resident one starts
        busy @ busy
        kv[:, :, table[:, 0], 0] = 0.0
        pos.fill_(0)
    stream.synchronize()
    mirror, expected = np.zeros(shape, np.float32), []
    ad_mirror = np.zeros(1024, np.float32)
    ck.checkpoint_async(stream)   # the base image
    expected.append((mirror.copy(), ad_mirror.copy()))
    with torch.cuda.stream(stream):
        for step in range(2 * max_blocks * 4):   # two rounds of 16 positions
            p = step % (max_blocks * 4)
            value = float(step + 1)
            blocks = table[:, p // 4]
            kv[:, :, blocks, p % 4] = value
            for b in table[:, p // 4].tolist():
                mirror[:, :, b, p % 4] = value
            pos.fill_(p)
            ck.checkpoint_async(stream)
            expected.append((mirror.copy(), ad_mirror.copy()))
            at = (step * 37) % 1024
            ad[at] = value          # after the capture point: in the next checkpoint only
            ad_mirror[at] = value
            busy @ busy   # the gather runs beside this
    ck.flush()
    writer = ck._writer
    if device_side == "ring":
        assert writer.gather_ring is not None and writer.gather_ring.tickets[0] > 0
    else:   # every slot forks its gathers: a side graph, waited for through the caller's event
        assert writer.gather_ring is None and all(s.side is not None and s.fork is not None
                                                  for s in writer.ring)
        assert writer.staging.snapshots == {1}   # "ad" scanned from its copy
    ck.close()
    for k, (want, want_ad) in enumerate(expected, start=1):
        got = restored(tmp_path / "r.clog", checkpoint=k)
        np.testing.assert_array_equal(got["kv"].numpy().reshape(shape), want, err_msg=f"checkpoint {k}")
        np.testing.assert_array_equal(got["ad"].numpy(), want_ad, err_msg=f"checkpoint {k}")


def test_device_side_ring_is_refused_where_it_cannot_run_in_one_line(tmp_path):
    rt = Runtime("reference")
    x = rt.to_device(np.zeros(N, np.float32))
    with pytest.raises(ConcordiaError, match=r"needs a backend with streams.*reference has none"):
        Checkpointer(rt, {"x": x}, str(tmp_path / "a.clog"), device_side="ring")
    with pytest.raises(ConcordiaError, match=r"'fork' needs a backend with streams and graphs "
                                             r"\(cuda\); reference has none"):
        Checkpointer(rt, {"x": x}, str(tmp_path / "c.clog"), device_side="fork")
    with pytest.raises(ConcordiaError, match="device_side must be one of auto, stream, fork, ring, got 'gpu'"):
        Checkpointer(rt, {"x": x}, str(tmp_path / "b.clog"), device_side="gpu")
    from concordia.handlers.ring_gather import RingGather
    if os.environ.get("CUDA_MODULE_LOADING", "").upper() != "EAGER":
        with pytest.raises(ConcordiaError, match="needs CUDA_MODULE_LOADING=EAGER"):
            RingGather(rt, [], [])


@pytest.mark.parametrize("backend", [b for b in ("reference", "opencl", "cuda") if b in BACKENDS])
def test_the_ring_gather_handler_copies_the_listed_pages_once_triggered(backend):
    """Design (b)'s handler on the persistent kernel of every backend that runs one: its ticket
    reached, three groups stride over seven listed pages into the staging."""
    from concordia.handlers import kernels as hk
    from concordia.handlers.persistent import PersistentRuntime
    rt = Runtime(backend)
    wpp, n_pages = 64, 12
    src = np.arange(wpp * n_pages, dtype=np.uint32)
    listed = np.array([9, 2, 11, 0, 5, 7, 3, 1], np.int32)
    cur, pages, count = rt.to_device(src), rt.to_device(listed), rt.to_device(np.array([7], np.int32))
    staging = rt.to_device(np.zeros(8 * wpp, np.uint32))
    trigger = rt.to_device(np.array([0, 5], np.int32))   # trigger[1] has reached ticket 5
    pr = PersistentRuntime(rt, blocks=2, block_size=hk.GROUP, ring_slots=16)
    pr.register_many([("g", hk.ring_page_gatherer(wpp, src.size), [cur, pages, count, staging, trigger])])
    pr.start()
    try:
        pr.wait_range(*pr.publish(pr.encode_tasks("g", [(1, 5)], groups=3, split=1)))
    finally:
        assert pr.shutdown() == []
    got = staging.numpy().reshape(8, wpp)
    np.testing.assert_array_equal(got[:7], src.reshape(n_pages, wpp)[listed[:7]])
    assert not got[7].any()
    from concordia.handlers.ring_gather import with_ticket   # the publish's pre-encoded records
    records = pr.encode_tasks("g", [(1, 0)], groups=16, split=1)
    for ticket in (1, 70_000, 2**31 - 5):
        np.testing.assert_array_equal(with_ticket(records, ticket),
                                      pr.encode_tasks("g", [(1, ticket)], groups=16, split=1))


def test_the_compaction_fsyncs_its_new_file_as_it_writes(tmp_path, monkeypatch):
    """Every PACE_BYTES written, an fsync: the new file never holds much unsynced data for the
    writer's next fsync to wait behind (one journal commit takes both)."""
    from concordia.handlers import compaction as hc
    monkeypatch.setattr(hc, "PACE_BYTES", 16 << 10)
    synced = []
    monkeypatch.setattr(hc.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_size))
    with open(tmp_path / "n", "wb") as fh:
        paced = hc._Paced(fh)
        for _ in range(10):
            paced.write(b"x" * (6 << 10))
    assert synced == [18 << 10, 36 << 10, 54 << 10]   # whole on disk up to there, each time


def test_a_closed_rings_slots_serve_the_next_ring_over_the_same_memory(tmp_path, monkeypatch):
    """A guard a generate call made its ring's slots anew (7-8 ms each on an H100) though the
    next call's cache sits at the same addresses: a closed ring of host-listed regions leaves
    its slots to the runtime, the next ring over the same memory takes them (no new graph,
    every checkpoint restoring exactly), other memory gets slots of its own, at most
    IDLE_RINGS rings are kept, and release_idle gives every one back."""
    import concordia.handlers.async_checkpoint as ac
    from concordia.handlers import staging_ring
    monkeypatch.setattr(ac, "HOLD_S", 30.0)   # each capture held until the next: two slots
    rt = _runtime("reference-streams")
    b = rt.backend
    shape = (1, 2, 16, 64)
    bufs = [[rt.to_device(np.zeros(np.prod(shape), np.float32)) for _ in "kv"] for _ in range(3)]

    def guarded(kb, vb, name, steps=6):
        scanner = SequenceCacheScanner(shape, 4, 256, users=2)
        ck = Checkpointer(rt, {"k": kb, "v": vb}, str(tmp_path / name), page_size=256,
                          scanners={"k": scanner, "v": scanner}, ring_slots=3)
        k, v = kb.numpy().reshape(shape), vb.numpy().reshape(shape)
        ck.checkpoint_async()                 # the base image, at once
        want = []
        for pos in range(steps):
            k[:, :, pos], v[:, :, pos] = pos + 1.0 + len(name), -pos - 1.0
            kb.write(k.reshape(-1))
            vb.write(v.reshape(-1))
            scanner.mark(pos, pos)
            ck.checkpoint_async()
            want.append((k.copy(), v.copy()))
        ck.flush()
        slots = len(ck._writer.ring)
        ck.close()
        for n, (wk, wv) in enumerate(want, start=2):
            got = restored(tmp_path / name, checkpoint=n)
            np.testing.assert_array_equal(got["k"].numpy(), wk.reshape(-1))
            np.testing.assert_array_equal(got["v"].numpy(), wv.reshape(-1))
        return slots
    made = guarded(*bufs[0], "a.clog")
    assert made == b.graphs_made >= 2 and b.graphs_destroyed == 0   # kept, not given back
    again = guarded(*bufs[0], "b.clog")
    # the same memory: the kept slots first (a third only if the writer held two this time)
    assert b.graphs_made == made + max(0, again - made)
    guarded(*bufs[1], "c.clog")
    assert b.graphs_made > made                           # other memory: slots of its own
    guarded(*bufs[2], "d.clog")
    kept = b.graphs_made - b.graphs_destroyed
    assert b.graphs_destroyed > 0                         # three rings: the oldest given back
    assert staging_ring.release_idle(rt) == kept <= staging_ring.IDLE_RINGS * 3
    assert b.graphs_destroyed == b.graphs_made and staging_ring.release_idle(rt) == 0


def test_base_pages_are_the_pages_of_the_positions_marked_so_far():
    """SequenceCacheScanner.base_pages (zero_unmarked): exactly the pages any position from 0
    to the highest marked touches, whatever the rows and pages; None without the flag."""
    shape, itemsize, page = (2, 3, 50, 40), 4, 256     # 160 B rows straddle 256 B pages
    plain = SequenceCacheScanner(shape, itemsize, page)
    plain.mark(0, 5)
    assert plain.base_pages() is None
    s = SequenceCacheScanner(shape, itemsize, page, zero_unmarked=True)
    assert len(s.base_pages()) == 0
    s.mark(0, 3)
    s.mark(4, 17)
    s.committed()
    row = 40 * itemsize
    want = sorted({(b * 50 + p) * row // page + k for b in range(6) for p in range(18)
                   for k in range(2) if (b * 50 + p) * row // page + k <= ((b * 50 + p + 1) * row - 1) // page})
    assert s.base_pages().tolist() == want

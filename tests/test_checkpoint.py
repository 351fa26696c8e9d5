"""Delta checkpoints: every mode on every backend present, restore across backends, the log's
damage handling (each kind made on purpose), compaction, store tracking, DLPack regions."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from concordia.backends import backend_status
from concordia import ConcordiaError, Ptr, Runtime, f32, global_id, i32, kernel
from concordia.handlers import Checkpointer, DeltaLog, LogError, compact, instrument_stores, scan_log
from concordia.handlers.log import (COMMIT, HEADER, HEADER_SIZE, PAGE, PAGES, RECORD_SIZE, SCATTER,
                                    committed_image, page_runs, split_run)

BACKENDS = [n for n in ("reference", "opencl", "cuda", "tenstorrent") if backend_status()[n].ok]


@kernel
def bump(x: Ptr[f32], stride: i32, n: i32):
    i = global_id(0) * stride
    if i < n:
        x[i] = x[i] + 1.0


def make_log(path, backend="reference", mode="shadow", n=1 << 14, steps=3):
    rt = Runtime(backend)
    kv = rt.to_device(np.arange(n, dtype=np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(path), page_size=4096, mode=mode)
    states, stats = [], []
    for s in range(steps):
        if s:
            rt.launch(bump, global_size=64, local_size=64, args=(kv, 1024 * (s + 1), n))
        stats.append(ck.checkpoint())
        states.append(kv.numpy())
    ck.close()
    return states, stats


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["shadow", "hash", "tracked"])
def test_checkpoint_mutate_restore_on_every_backend(tmp_path, backend, mode):
    rt = Runtime(backend)
    kv = rt.to_device(np.zeros(1 << 20, np.float32))           # 4 MiB: 1024 pages
    adapter = rt.to_device(np.arange(3000, dtype=np.int32))    # a partial last page
    path = str(tmp_path / "state.clog")
    ck = Checkpointer(rt, {"kv": kv, "adapter": adapter}, path, page_size=4096, mode=mode)
    first = ck.checkpoint()
    # the kv's 1,024 pages of zeros are left out of the base image: they restore as zeros
    assert first.full and first.pages == 3 and first.bytes == 12000
    ck.launch(bump, global_size=64, local_size=64, args=(kv, 3 * 1024, 1 << 20))
    second = ck.checkpoint()
    assert (second.pages, second.bytes, second.full) == (64, 64 * 4096, False)
    assert ck.checkpoint().pages == 0
    want = {"kv": kv.numpy(), "adapter": adapter.numpy()}
    ck.close()
    for target in BACKENDS:
        got = Checkpointer.restore(path, Runtime(target))
        for name in want:
            assert np.array_equal(got[name].numpy(), want[name]), (target, name)


def test_content_hash_is_committed_and_checked(tmp_path):
    rt = Runtime("reference")
    kv = rt.to_device(np.arange(4096, dtype=np.float32))
    path = str(tmp_path / "h.clog")
    with Checkpointer(rt, {"kv": kv}, path) as ck:
        ck.checkpoint(content_hash=True)
    restored = Checkpointer.restore(path, Runtime("reference"))
    assert np.array_equal(restored["kv"].numpy(), kv.numpy())


def test_reopening_a_log_continues_it(tmp_path):
    path = tmp_path / "c.clog"
    states, _ = make_log(path, steps=2)
    rt = Runtime("reference")
    kv = rt.to_device(states[-1])
    with Checkpointer(rt, {"kv": kv}, str(path)) as ck:
        assert ck.checkpoint().checkpoint_id == 3        # continues the numbering, full base
        rt.launch(bump, global_size=1, local_size=1, args=(kv, 1, 1 << 14))
        assert ck.checkpoint().pages == 1
        want = kv.numpy()
    assert np.array_equal(Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy(), want)


def test_a_closed_checkpointer_refuses_in_one_line_and_closes_twice(tmp_path):
    """close() gives its buffers and log back; a checkpoint after it says so (it raised a
    TypeError from a freed buffer, or 'write to closed file')."""
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(4096, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(tmp_path / "c.clog"))
    ck.checkpoint()
    ck.close()
    ck.close()
    for call in (ck.checkpoint, ck.checkpoint_async, ck.compact):
        with pytest.raises(ConcordiaError, match=r"c\.clog: this Checkpointer is closed"):
            call()
    assert Checkpointer.restore(str(tmp_path / "c.clog"), rt)["kv"].numpy().size == 4096


def test_log_of_another_layout_is_refused(tmp_path):
    path = tmp_path / "l.clog"
    make_log(path, n=1 << 14, steps=1)
    rt = Runtime("reference")
    with pytest.raises(ConcordiaError, match="written for other regions"):
        Checkpointer(rt, {"kv": rt.to_device(np.zeros(1 << 15, np.float32))}, str(path))


# ---- damage, made on purpose ------------------------------------------------------------------

def verify(path):
    r = subprocess.run([sys.executable, "-m", "concordia", "log", "verify", str(path)],
                       capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr


def test_good_log_verifies(tmp_path):
    make_log(tmp_path / "g.clog")
    code, out = verify(tmp_path / "g.clog")
    assert code == 0 and "sound" in out and "3 commits" in out


def test_truncation_at_every_point_recovers_the_last_commit_before_it(tmp_path):
    path = tmp_path / "t.clog"
    states, _ = make_log(path, n=1 << 12, steps=3)
    data = path.read_bytes()
    scan = scan_log(str(path))
    commit_ends = [scan.records[i - 1].offset + RECORD_SIZE + len(scan.records[i - 1].payload)
                   for i in scan.commit_ends]
    rng = np.random.default_rng(0)
    cuts = sorted(set(rng.integers(HEADER_SIZE, len(data), 40).tolist()) | set(commit_ends))
    for cut in cuts:
        path.write_bytes(data[:cut])
        done = sum(1 for e in commit_ends if e <= cut)
        if done == 0:
            with pytest.raises(LogError, match="no committed checkpoint"):
                Checkpointer.restore(str(path), Runtime("reference"))
            continue
        got = Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy()
        assert np.array_equal(got, states[done - 1]), cut
        code, out = verify(path)
        assert (code == 0) == (cut in commit_ends), (cut, out)
        if code:
            assert "at byte " in out and ("torn tail" in out or "incomplete" in out)


def poked_log(path, commits=5, n=1 << 14, fill=0.0):
    """The issue's case: a 16K-float region, one page poked per commit. (With `fill` 0 the base
    image holds no pages: a base image leaves out pages of zeros.)"""
    rt = Runtime("reference")
    kv = rt.to_device(np.full(n, fill, np.float32))
    ck = Checkpointer(rt, {"kv": kv}, str(path), page_size=4096)
    states = []
    for c in range(commits):
        if c:
            host = kv.numpy()
            host[(c * 1024) % n] = c
            kv.write(host)
        ck.checkpoint()
        states.append(kv.numpy())
    ck.close()
    return states


def record_of(scan, checkpoint, kind=PAGE):
    ids = [0] + scan.checkpoint_ids
    for k, end in enumerate(scan.commit_ends):
        for r in scan.records[(scan.commit_ends[k - 1] if k else 0):end]:
            if ids[k + 1] == checkpoint and r.kind == kind:
                return r
    raise AssertionError(checkpoint)


def flip(path, offset, mask=0x40):
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def test_mid_file_damage_is_refused_never_dropped(tmp_path):
    path = tmp_path / "f.clog"
    states = poked_log(path)
    victim = record_of(scan_log(str(path)), 3)
    flip(path, victim.offset + RECORD_SIZE + 100)
    size = path.stat().st_size
    with pytest.raises(LogError) as e:
        Checkpointer.restore(str(path), Runtime("reference"))
    msg = str(e.value)
    assert f"at byte {victim.offset}: checksum mismatch" in msg and "checkpoint 3" in msg
    assert "checkpoints 3..5 follow it" in msg and "concordia log repair" in msg and "\n" not in msg
    rt = Runtime("reference")
    with pytest.raises(LogError, match=f"at byte {victim.offset}"):   # opening to append
        Checkpointer(rt, {"kv": rt.zeros(1 << 14, np.float32)}, str(path))
    assert path.stat().st_size == size and not list(tmp_path.glob("f.clog.*"))
    with pytest.raises(LogError, match="corrupt mid-file"):
        compact(str(path))
    code, out = verify(path)
    assert code == 1 and f"at byte {victim.offset}" in out and out.count("\n") == 1
    older = Checkpointer.restore(str(path), Runtime("reference"), checkpoint=2)["kv"].numpy()
    assert np.array_equal(older, states[1])                      # on purpose, by id
    with pytest.raises(LogError, match="checkpoint 4 is not among the sound commits"):
        Checkpointer.restore(str(path), Runtime("reference"), checkpoint=4)


def test_damaged_base_image_names_its_record(tmp_path):
    path = tmp_path / "b.clog"
    poked_log(path, commits=3, fill=1.0)
    victim = record_of(scan_log(str(path)), 1, kind=PAGES)   # the base image: one run
    flip(path, victim.offset + RECORD_SIZE + 7)
    with pytest.raises(LogError) as e:
        Checkpointer.restore(str(path), Runtime("reference"))
    assert f"at byte {victim.offset}" in str(e.value) and "checkpoint 1" in str(e.value)
    assert "no committed checkpoint" not in str(e.value)


def test_repair_backs_up_then_cuts_at_the_last_sound_commit(tmp_path):
    path = tmp_path / "r.clog"
    states = poked_log(path)
    victim = record_of(scan_log(str(path)), 3)
    flip(path, victim.offset + RECORD_SIZE + 5)
    damaged = path.read_bytes()
    r = subprocess.run([sys.executable, "-m", "concordia", "log", "repair", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "commits dropped: 3, 4, 5" in r.stdout and "kept: checkpoint 2" in r.stdout
    assert (tmp_path / "r.clog.bak").read_bytes() == damaged
    assert verify(path)[0] == 0
    got = Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy()
    assert np.array_equal(got, states[1])


def test_repair_to_an_older_checkpoint_and_clear_errors(tmp_path):
    path = tmp_path / "o.clog"
    states = poked_log(path, commits=4)
    cli = [sys.executable, "-m", "concordia", "log", "repair", str(path)]
    r = subprocess.run(cli + ["--to-checkpoint", "9"], capture_output=True, text=True)
    assert r.returncode == 1 and "checkpoint 9 is not among the sound commits (1..4)" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.clog.bak").exists()
    r = subprocess.run(cli + ["--to-checkpoint", "2"], capture_output=True, text=True)
    assert r.returncode == 0 and "commits dropped: 3, 4" in r.stdout
    got = Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy()
    assert np.array_equal(got, states[1])
    r = subprocess.run(cli, capture_output=True, text=True)   # a sound log: backup, no cut
    assert r.returncode == 0 and "nothing to cut" in r.stdout
    assert (tmp_path / "o.clog.bak.1").exists()
    empty = tmp_path / "e.clog"
    DeltaLog(str(empty)).close()                               # a header, no commit
    for target, why in ((empty, "no sound commit to keep"), (tmp_path / "no.clog", "no such log")):
        r = subprocess.run(cli[:-1] + [str(target)], capture_output=True, text=True)
        assert r.returncode == 1 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_every_flipped_byte_is_refused_or_a_torn_tail(tmp_path):
    """A flip anywhere in any record: the last record's damage is a torn tail (its commit is
    lost, as in a crash); anywhere else, restoring refuses at that record's offset."""
    path = tmp_path / "x.clog"
    states = poked_log(path, commits=4, n=1 << 12)
    good = path.read_bytes()
    scan = scan_log(str(path))
    rng = np.random.default_rng(7)
    for r in scan.records:
        end = r.offset + RECORD_SIZE + len(r.payload)
        path.write_bytes(good)
        flip(path, int(rng.integers(r.offset, end)), int(rng.integers(1, 256)))
        if r is scan.records[-1]:
            got = Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy()
            assert np.array_equal(got, states[-2])
            continue
        with pytest.raises(LogError, match=f"at byte {r.offset}: .*corrupt mid-file"):
            Checkpointer.restore(str(path), Runtime("reference"))


def test_duplicated_record_is_refused(tmp_path):
    path = tmp_path / "d.clog"
    make_log(path, n=1 << 12, steps=2)
    scan = scan_log(str(path))
    r = scan.records[3]
    raw = path.read_bytes()
    rec = raw[r.offset:r.offset + RECORD_SIZE + len(r.payload)]
    end = r.offset + len(rec)
    path.write_bytes(raw[:end] + rec + raw[end:])
    code, out = verify(path)
    assert code == 1 and f"at byte {end}" in out


def test_record_from_another_log_does_not_chain(tmp_path):
    a, b = tmp_path / "a.clog", tmp_path / "b.clog"
    make_log(a, n=1 << 12, steps=2)
    make_log(b, n=1 << 12, steps=2)
    ra, rb = scan_log(str(a)), scan_log(str(b))
    x = rb.records[-1]
    tail = b.read_bytes()[x.offset:]
    a.write_bytes(a.read_bytes() + tail)
    code, out = verify(a)
    assert code == 1 and "checksum mismatch" in out


def test_foreign_and_newer_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.clog"
    foreign.write_bytes(b"SQLite format 3\0" + bytes(100))
    code, out = verify(foreign)
    assert code == 1 and "not a Concordia delta log" in out and out.count("\n") == 1
    path = tmp_path / "n.clog"
    make_log(path, steps=1)
    data = bytearray(path.read_bytes())
    data[8:10] = struct.pack("<H", 9)
    path.write_bytes(bytes(data))
    code, out = verify(path)
    assert code == 1 and "newer Concordia (format v9" in out
    data[8:10] = struct.pack("<H", 1)
    data[30] ^= 1                                             # inside the header
    path.write_bytes(bytes(data))
    assert "header checksum mismatch" in verify(path)[1]


def test_reopen_cuts_a_torn_tail_after_saving_it(tmp_path):
    path = tmp_path / "r.clog"
    states, _ = make_log(path, n=1 << 12, steps=2)
    data = path.read_bytes()
    for k, torn in enumerate((data[HEADER_SIZE:HEADER_SIZE + 40], bytes(4096))):
        path.write_bytes(data + torn)               # a torn, foreign-looking tail; then zeros
        log = DeltaLog(str(path))
        assert os.path.getsize(path) == len(data)
        saved = tmp_path / ("r.clog.broken" + (f".{k}" if k else ""))
        assert log.cut_backup == str(saved) and saved.read_bytes() == torn
        log.close()
    log = DeltaLog(str(path))
    log.commit(99, {"note": "after repair"})
    log.close()
    assert verify(path)[0] == 0


def test_compaction_keeps_the_image_and_shrinks_the_log(tmp_path):
    path = tmp_path / "k.clog"
    states, _ = make_log(path, n=1 << 14, steps=6)
    before = os.path.getsize(path)
    after = compact(str(path))
    assert after < before
    assert np.array_equal(Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy(), states[-1])
    # a crash during compaction leaves only a stray temporary file; the log is untouched
    (tmp_path / "k.clog.partial").write_bytes(b"partial")
    assert np.array_equal(Checkpointer.restore(str(path), Runtime("reference"))["kv"].numpy(), states[-1])


def test_bad_arguments_are_clear(tmp_path):
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(1024, np.float32))
    with pytest.raises(ConcordiaError, match="fsync must be one of"):
        Checkpointer(rt, {"kv": kv}, str(tmp_path / "x.clog"), fsync="sometimes")
    with pytest.raises(ConcordiaError, match="page_size must be a power of two"):
        Checkpointer(rt, {"kv": kv}, str(tmp_path / "y.clog"), page_size=3000)
    with pytest.raises(ConcordiaError, match="must be a device buffer"):
        Checkpointer(rt, {"kv": np.zeros(4)}, str(tmp_path / "z.clog"))
    with pytest.raises(ConcordiaError, match="mode must be one of"):
        Checkpointer(rt, {"kv": kv}, str(tmp_path / "w.clog"), mode="magic")
    with pytest.raises(ConcordiaError, match="no such log"):
        Checkpointer.restore(str(tmp_path / "missing.clog"), rt)


# ---- store tracking and DLPack ----------------------------------------------------------------

def test_store_tracking_pass_marks_pages():
    k = instrument_stores(bump.kernel, {"x": 1024})
    text = str(k.kernel if hasattr(k, "kernel") else k)
    assert k.params[-1].name == "x.dirty" and "shr" in text
    rt = Runtime("reference")
    x, flags = rt.zeros(8192, np.float32), rt.zeros(8, np.int32)
    rt.launch(k, global_size=3, local_size=1, args=(x, 3000, 8192, flags))
    assert flags.numpy().tolist() == [1, 0, 1, 0, 0, 1, 0, 0]    # elements 0, 3000, 6000


def test_dlpack_region_is_checkpointed_without_copy(tmp_path):
    host = np.zeros(4096, np.float32)
    rt = Runtime("reference")
    kv = rt.from_dlpack(host)
    with Checkpointer(rt, {"kv": kv}, str(tmp_path / "dl.clog")) as ck:
        ck.checkpoint()
        host[2000] = 5.0                                          # the owner writes in place
        assert ck.checkpoint().pages == 1
    assert Checkpointer.restore(str(tmp_path / "dl.clog"), rt)["kv"].numpy()[2000] == 5.0


def _torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


HOST_WRAPPERS = [n for n in ("reference", "tenstorrent") if backend_status()[n].ok]


@pytest.mark.skipif(_torch() is None, reason="needs torch")
@pytest.mark.parametrize("backend", HOST_WRAPPERS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float8_e4m3fn", "int8", "bool"])
def test_any_dtype_is_a_region(tmp_path, backend, dtype):
    """Regions are bytes: a bf16 / fp16 / fp8 / int8 / bool tensor wraps without a copy, is
    checkpointed as it changes in place, and restores bit for bit into a new tensor."""
    torch = _torch()
    dt = getattr(torch, dtype)
    n = 8192 // dt.itemsize                                   # two 4 KiB pages
    kv = torch.zeros(n, dtype=dt)
    rt = Runtime(backend)
    buf = rt.from_dlpack(kv)
    assert buf.nbytes == kv.numel() * dt.itemsize
    log = str(tmp_path / f"{dtype}.clog")
    with Checkpointer(rt, {"kv": buf}, log) as ck:
        ck.checkpoint()
        kv[n - 3] = 1                                         # the owner writes in place
        stats = ck.checkpoint()
    assert stats.pages == 1                                   # seen through the wrapped bytes
    again = torch.zeros(n, dtype=dt)
    Checkpointer.restore(log, rt, into={"kv": rt.from_dlpack(again)})
    as_bytes = lambda t: t.view(torch.uint8).numpy().tobytes()
    assert as_bytes(again) == as_bytes(kv) and bool(again[n - 3] == 1)
    fresh = Checkpointer.restore(log, Runtime("reference"))["kv"]   # into a new buffer
    assert fresh.numpy().tobytes() == as_bytes(kv) and fresh.dtype == buf.dtype


def test_dlpack_types_regions_cannot_hold_are_refused_with_the_reason():
    from concordia.backends.dlpack import region_dtype
    assert region_dtype(4, 16, 1) == np.uint16                # bfloat16: its bytes
    assert region_dtype(2, 16, 1) == np.float16
    with pytest.raises(ConcordiaError, match="4-bit elements; regions hold whole bytes"):
        region_dtype(17, 4, 1)
    with pytest.raises(ConcordiaError, match="4-lane vectors cannot be wrapped"):
        region_dtype(2, 32, 4)


def _torch_cuda():
    try:
        import torch
        return torch if torch.cuda.is_available() and backend_status()["cuda"].ok else None
    except ImportError:
        return None


@pytest.mark.skipif(_torch_cuda() is None, reason="needs torch with a CUDA GPU and the cuda backend")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_torch_cuda_tensor_as_region_restores_on_reference(tmp_path, dtype):
    torch = _torch_cuda()
    kv = torch.zeros(1 << 20, dtype=getattr(torch, dtype), device="cuda")
    rt = Runtime("cuda")
    region = rt.from_dlpack(kv)
    with Checkpointer(rt, {"kv": region}, str(tmp_path / "t.clog")) as ck:
        ck.checkpoint()
        kv.view(torch.uint8)[20000:20040] = 7   # the engine writes its own tensor (one page)
        torch.cuda.synchronize()
        assert ck.checkpoint().pages == 1
    got = Checkpointer.restore(str(tmp_path / "t.clog"), Runtime("reference"))["kv"].numpy()
    assert got.tobytes() == kv.view(torch.uint8).cpu().numpy().tobytes()
    with pytest.raises(ConcordiaError, match="wraps tensors in host memory; this one is on cuda:0"):
        Runtime("reference").from_dlpack(kv)


def test_a_base_image_is_a_few_page_runs_and_reads_back(tmp_path):
    """Consecutive pages travel as PAGES records (up to 256 pages each): reading a log is a
    loop over records, so a base image of 1,024 pages is 4 records, not 1,024."""
    rt = Runtime("reference")
    data = np.random.default_rng(0).random((1 << 20) + 100, dtype=np.float32)   # short last page
    kv = rt.to_device(data)
    path = str(tmp_path / "runs.clog")
    with Checkpointer(rt, {"kv": kv}, path) as ck:
        ck.checkpoint()
        host = kv.numpy()
        host[[5, 6, 7, 9000]] += 1      # pages 0 (three floats) and 8 (one): two lone pages
        kv.write(host)
        assert ck.checkpoint().pages == 2
    scan = scan_log(path)
    kinds = [r.kind for r in scan.records]
    # 1,025 pages: 4 runs of 256, then the short last page alone; the delta's two lone whole
    # pages (0 and 8) together in one SCATTER record
    assert kinds.count(PAGES) == 4 and kinds.count(PAGE) == 1 and kinds.count(SCATTER) == 1
    assert scan.records[5].kind == PAGE and len(scan.records[5].payload) == 400
    scattered = next(r for r in scan.records if r.kind == SCATTER)
    assert [p for p, _ in split_run(scattered, 4096)] == [0, 8]
    got = Checkpointer.restore(path, Runtime("reference"))["kv"].numpy()
    assert np.array_equal(got, host)
    compact(path)
    assert np.array_equal(Checkpointer.restore(path, Runtime("reference"))["kv"].numpy(), host)


def test_page_runs_break_at_gaps_short_pages_and_the_longest_run():
    pages = [(0, b"a" * 8), (1, b"b" * 8), (2, b"c" * 8), (4, b"d" * 8), (5, b"e" * 3),
             (6, b"f" * 8)]
    runs = list(page_runs(pages, 8, longest=2))
    assert runs == [(PAGES, 0, b"a" * 8 + b"b" * 8), (PAGE, 2, b"c" * 8),
                    (PAGES, 4, b"d" * 8 + b"e" * 3), (PAGE, 6, b"f" * 8)]
    # with scatter, the lone whole pages (2 and 6) go together after the runs
    runs = list(page_runs(pages, 8, longest=2, scatter=True))
    assert runs == [(PAGES, 0, b"a" * 8 + b"b" * 8), (PAGES, 4, b"d" * 8 + b"e" * 3),
                    (SCATTER, 2, struct.pack("<QQ", 2, 6) + b"c" * 8 + b"f" * 8)]


def test_scattered_rows_of_a_kv_cache_go_in_one_record_per_checkpoint(tmp_path):
    """A StaticCache-like layout (batch, heads, positions, head_dim): each step writes one row
    per head, rows a whole head apart, so a step's pages are never consecutive. They go as one
    SCATTER record per checkpoint (was one record a page), restore exactly, survive
    compaction, and a flipped byte inside one is refused with its offset."""
    rt = Runtime("reference")
    heads, positions, dim = 8, 64, 1024          # a row is one 4 KiB page of float32
    kv = rt.to_device(np.zeros((heads, positions, dim), np.float32))
    path = str(tmp_path / "kv.clog")
    host = kv.numpy().reshape(heads, positions, dim)
    with Checkpointer(rt, {"kv": kv}, path) as ck:
        ck.checkpoint()
        for pos in range(5):
            host[:, pos] = pos + 1 + np.arange(heads, dtype=np.float32)[:, None]
            kv.write(host.reshape(-1))
            assert ck.checkpoint().pages == heads
    scan = scan_log(path)
    deltas = [r for r in scan.records[scan.commit_ends[0]:] if r.kind != COMMIT]
    assert [r.kind for r in deltas] == [SCATTER] * 5
    assert [p for p, _ in split_run(deltas[2], 4096)] == [h * positions + 2 for h in range(heads)]
    assert np.array_equal(Checkpointer.restore(path, Runtime("reference"))["kv"].numpy(), host.reshape(-1))
    compact(path)
    assert np.array_equal(Checkpointer.restore(path, Runtime("reference"))["kv"].numpy(), host.reshape(-1))
    with Checkpointer(rt, {"kv": kv}, path) as ck:   # a compacted file takes SCATTER records too
        ck.checkpoint()                               # (a reopened log starts with a full image)
        host[:, 9] = 7
        kv.write(host.reshape(-1))
        assert ck.checkpoint().pages == heads
    victim = [r for r in scan_log(path).records if r.kind == SCATTER][-1]
    raw = bytearray(open(path, "rb").read())
    raw[victim.offset + RECORD_SIZE + 8 * heads + 5] ^= 1   # inside its pages, not its index
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ConcordiaError, match=f"at byte {victim.offset}: checksum mismatch"):
        Checkpointer.restore(path, Runtime("reference"))


def test_a_base_image_of_many_short_stretches_goes_in_one_scatter_record(tmp_path):
    """A base image whose pages lie in many short stretches (a StaticCache's first rows, one
    stretch a head) is one SCATTER record, not a record a stretch; one of a few long
    stretches stays PAGES runs; both restore exactly."""
    rt = Runtime("reference")
    heads, max_len, row = 8, 81, 64                  # 256-byte rows = pages
    host = np.zeros(heads * max_len * row, np.float32)
    for h in range(heads):                           # 17 rows written at each head's start
        host[h * max_len * row:(h * max_len + 17) * row] = h + 1
    kv = rt.to_device(host)
    path = str(tmp_path / "s.clog")
    with Checkpointer(rt, {"kv": kv}, path, page_size=256) as ck:
        assert ck.checkpoint().pages == heads * 17
    kinds = [r.kind for r in scan_log(path).records if r.kind in (PAGE, PAGES, SCATTER)]
    assert kinds == [SCATTER]
    np.testing.assert_array_equal(Checkpointer.restore(path, rt)["kv"].numpy(), host)
    host[:] = 0
    host[:40 * 1024] = 1                             # one long stretch and one short one
    host[-3] = 2
    kv.write(host)
    os.remove(path)
    with Checkpointer(rt, {"kv": kv}, path, page_size=256) as ck:
        ck.checkpoint()
    kinds = [r.kind for r in scan_log(path).records if r.kind in (PAGE, PAGES, SCATTER)]
    assert SCATTER not in kinds and PAGES in kinds
    np.testing.assert_array_equal(Checkpointer.restore(path, rt)["kv"].numpy(), host)


def test_a_base_image_in_pieces_goes_in_as_one_region_image(tmp_path):
    """A base image handed over as pieces (a listed region's spans: one a head) is one
    SCATTER record for the region where its pages are short stretches, and runs where a
    piece ends in the region's short last page; the image folds back exactly."""
    path = str(tmp_path / "p.clog")
    log = DeltaLog(path, "always")
    layout = {"format": "concordia-regions/1", "page_size": 256, "regions": [
        {"id": 0, "name": "kv", "dtype": "|u1", "size": 8 * 64 * 256, "nbytes": 8 * 64 * 256,
         "page_size": 256},
        {"id": 1, "name": "tail", "dtype": "|u1", "size": 1000, "nbytes": 1000, "page_size": 256}]}
    log.write_layout(layout)
    rng = np.random.default_rng(3)
    pieces = [(h * 64, rng.integers(1, 255, 17 * 256, dtype=np.uint8)) for h in range(8)]
    pieces[2][1][256:512] = 0                        # a page of zeros inside a piece: left out
    assert log.append_base(0, 256, pieces, 8 * 64 * 256) == (8 * 17 - 1, (8 * 17 - 1) * 256)
    tail = np.zeros(1024, np.uint8)
    tail[:1000] = rng.integers(1, 255, 1000, dtype=np.uint8)
    assert log.append_base(1, 256, [(0, tail[:512]), (2, tail[512:])], 1000)[0] == 4
    log.commit(1, {"checkpoint": 1, "sparse": True})
    log.close()
    kinds = [(r.region, r.kind) for r in scan_log(path).records if r.kind in (PAGE, PAGES, SCATTER)]
    assert kinds.count((0, SCATTER)) == 1 and (0, PAGES) not in kinds and (1, SCATTER) not in kinds
    image = committed_image(scan_log(path))
    want = np.zeros(8 * 64 * 256, np.uint8)
    for first, raw in pieces:
        want[first * 256:first * 256 + len(raw)] = raw
    np.testing.assert_array_equal(image.rows[0].reshape(-1), want)
    np.testing.assert_array_equal(image.rows[1].reshape(-1)[:1000], tail[:1000])


def test_a_base_image_leaves_out_its_pages_of_zeros(tmp_path):
    """A full checkpoint logs only the pages that are not all zeros, and its commit says so
    ("sparse"): the restore is exact, zeros included, even into a buffer that held something
    else; a later base image over a log whose older records hold those pages non-zero starts
    from zeros again; a compaction keeps the log sparse; a v3 file's base holds every page."""
    rt = Runtime("reference")
    host = np.zeros(64 * 1024, np.float32)          # 64 pages of 4 KiB
    host[[5, 3000, 40000]] = [1, 2, 3]              # pages 0, 2 and 39
    kv = rt.to_device(host)
    path = str(tmp_path / "z.clog")
    with Checkpointer(rt, {"kv": kv}, path) as ck:
        base = ck.checkpoint()
        assert base.full and (base.pages, base.bytes) == (3, 3 * 4096)
        host[100] = 4
        kv.write(host)
        assert ck.checkpoint().pages == 1
    commits = [json.loads(r.payload) for r in scan_log(path).records if r.kind == COMMIT]
    assert commits[0]["sparse"] and "sparse" not in commits[1]
    junk = rt.to_device(np.full(64 * 1024, 9.0, np.float32))
    got = Checkpointer.restore(path, rt, into={"kv": junk})["kv"].numpy()
    np.testing.assert_array_equal(got, host)
    with Checkpointer(rt, {"kv": kv}, path) as ck:   # reopened: a new base image
        host[:] = 0
        host[64 * 1024 - 1] = 5                      # page 63 only
        kv.write(host)
        assert ck.checkpoint().pages == 1
    np.testing.assert_array_equal(Checkpointer.restore(path, rt, into={"kv": junk})["kv"].numpy(),
                                  host)
    compact(path)
    assert os.path.getsize(path) < 2 * 4096         # one page, the records' heads, the layout
    np.testing.assert_array_equal(Checkpointer.restore(path, rt)["kv"].numpy(), host)
    old = str(empty_log_of_version(tmp_path / "v3.clog", 3))
    with Checkpointer(rt, {"kv": kv}, old) as ck:
        assert ck.checkpoint().pages == 64
    commit = [json.loads(r.payload) for r in scan_log(old).records if r.kind == COMMIT][-1]
    assert "sparse" not in commit and scan_log(old).version == 3
    np.testing.assert_array_equal(Checkpointer.restore(old, rt)["kv"].numpy(), host)


def empty_log_of_version(path, version: int):
    """A new, empty log whose header says it was written in format `version`."""
    import crc32c
    DeltaLog(str(path)).close()
    raw = bytearray(path.read_bytes())
    fields = list(HEADER.unpack_from(raw))
    fields[1] = version
    body = HEADER.pack(*fields)
    raw[:HEADER_SIZE] = body + struct.pack("<I", crc32c.crc32c(body))
    path.write_bytes(bytes(raw))
    return path


def test_a_v2_log_takes_no_scatter_records(tmp_path):
    """Appending to a log of format v2 (before SCATTER) writes lone pages as PAGE records, so
    that a v2 reader can still read it."""
    rt = Runtime("reference")
    kv = rt.to_device(np.zeros(8 * 1024, np.float32))
    path = empty_log_of_version(tmp_path / "v2.clog", 2)
    with Checkpointer(rt, {"kv": kv}, str(path)) as ck:
        ck.checkpoint()
        host = kv.numpy()
        host[[0, 3000, 6000]] = 1                      # pages 0, 2 and 5
        kv.write(host)
        assert ck.checkpoint().pages == 3
    kinds = [r.kind for r in scan_log(str(path)).records]
    assert SCATTER not in kinds and kinds.count(PAGE) == 3
    assert np.array_equal(Checkpointer.restore(str(path), rt)["kv"].numpy(), host)


def test_a_v1_log_reads_and_takes_single_page_records(tmp_path):
    """A log written before PAGES records existed (format v1) restores as before, and
    appending to it writes PAGE records only, so that a v1 reader can still read it."""
    rt = Runtime("reference")
    kv = rt.to_device(np.arange(1 << 12, dtype=np.float32))
    path = empty_log_of_version(tmp_path / "v1.clog", 1)
    with Checkpointer(rt, {"kv": kv}, str(path)) as ck:
        ck.checkpoint()
    scan = scan_log(str(path))
    assert scan.version == 1 and PAGES not in {r.kind for r in scan.records}
    assert np.array_equal(Checkpointer.restore(str(path), rt)["kv"].numpy(), kv.numpy())


@pytest.mark.parametrize("version", [3, 2])
def test_append_scatter_writes_pages_from_arrays(tmp_path, version):
    """A checkpoint writer's staging as arrays (page indices, one row of bytes each, in any
    order) goes in as SCATTER records of at most `longest` pages, with no Python per page; the
    image is exact, and a v2 file gets the same pages as records it knows."""
    path = str(empty_log_of_version(tmp_path / "s.clog", version))
    rng = np.random.default_rng(5)
    pages = rng.permutation(2000)[:600].astype(np.int32)
    rows = rng.integers(0, 256, (600, 256), dtype=np.uint8)
    with DeltaLog(path) as log:
        log.write_layout({"format": "concordia-regions/1", "page_size": 256, "regions": [
            {"id": 3, "name": "r", "dtype": "|u1", "size": 2000 * 256, "nbytes": 2000 * 256,
             "page_size": 256}]})
        assert log.append_scatter(3, 256, pages, rows, longest=250) == 600
        log.commit(1, {})
    scan = scan_log(path)
    kinds = [r.kind for r in scan.records if r.kind != COMMIT][1:]
    if version == 3:
        assert kinds == [SCATTER] * 3
    else:
        assert SCATTER not in kinds and len(kinds) >= 1
    image = committed_image(scan)
    assert np.flatnonzero(image.present[3]).tolist() == sorted(pages.tolist())
    np.testing.assert_array_equal(image.rows[3][pages], rows)


@pytest.mark.parametrize("version", [4, 2])
def test_append_scatters_writes_several_regions_arrays(tmp_path, version):
    """Several regions' arrays in one call (the writer's path for the Hugging Face guard's 58
    regions): a SCATTER record each where every part has 2..longest pages; a part of one page
    or of more than `longest` (and a v2 file) goes through append_scatter. The image is exact."""
    path = str(empty_log_of_version(tmp_path / "m.clog", version))
    rng = np.random.default_rng(9)
    regions = [{"id": i, "name": f"r{i}", "dtype": "|u1", "size": 300 * 256, "nbytes": 300 * 256,
                "page_size": 256} for i in range(4)]
    sizes = [[8, 8, 8, 8], [8, 1, 8, 260]]   # the second call needs the fallback
    with DeltaLog(path) as log:
        log.write_layout({"format": "concordia-regions/1", "page_size": 256, "regions": regions})
        want = {}
        for call, ns in enumerate(sizes):
            parts = []
            for rid, n in enumerate(ns):
                pages = rng.permutation(300)[:n].astype("<u8")
                rows = rng.integers(0, 256, (n, 256), dtype=np.uint8)
                parts.append((rid, pages, rows))
                want.setdefault(rid, {}).update(zip(pages.tolist(), rows))
            assert log.append_scatters(256, parts, longest=256) == sum(ns)
            log.commit(call + 1, {})
    records = scan_log(path).records
    first_call = [r.kind for r in records[1:records.index(next(r for r in records
                                                              if r.kind == COMMIT))]]
    if version >= 3:
        assert first_call == [SCATTER] * 4
    else:
        assert SCATTER not in [r.kind for r in records] and len(first_call) >= 4
    image = committed_image(scan_log(path))
    for rid, pages in want.items():
        for p, row in pages.items():
            np.testing.assert_array_equal(image.rows[rid][p], row)


@pytest.mark.parametrize("seed", range(4))
def test_the_newest_first_fold_is_the_logs_pages_in_order(tmp_path, seed):
    """committed_image folds newest first, copying each page once; the oracle applies every
    record in log order, later over earlier. Random PAGE, PAGES (a short last page at the
    region's end) and SCATTER records (a page twice in one record: its later entry wins), two
    layouts (the image starts at the second), and a commit of an older checkpoint asked for.
    Bytes past a region's end (a short last page's padding) are not the region's: not compared."""
    rng = np.random.default_rng(seed)
    size, n_pages, nbytes = 256, 40, 40 * 256 - 100
    path = str(tmp_path / "f.clog")
    layout = {"format": "concordia-regions/1", "page_size": size, "regions": [
        {"id": 0, "name": "a", "dtype": "|u1", "size": nbytes, "nbytes": nbytes, "page_size": size},
        {"id": 1, "name": "b", "dtype": "|u1", "size": 8 * size, "nbytes": 8 * size, "page_size": size}]}
    oracle, images = {}, {}
    with DeltaLog(path, "no") as log:
        log.write_layout(layout)
        log.append(PAGE, b"\x07" * size, region=0, page=3)   # before the second layout: gone
        log.commit(1, {})
        log.write_layout(layout)
        oracle = {0: np.zeros((n_pages, size), np.uint8), 1: np.zeros((8, size), np.uint8)}
        for c in range(2, 12):
            for _ in range(3):
                rid = int(rng.integers(0, 2))
                pages = len(oracle[rid])
                kind = rng.integers(0, 3)
                if kind == 0:   # a run of pages, maybe up to the region's short end
                    first = int(rng.integers(0, pages))
                    n = int(rng.integers(1, pages - first + 1))
                    end = min((first + n) * size, nbytes if rid == 0 else pages * size)
                    data = rng.integers(0, 256, end - first * size, dtype=np.uint8)
                    log.append_many(PAGES if n > 1 else PAGE, rid, [(first, data.tobytes())])
                    oracle[rid].reshape(-1)[first * size:end] = data
                else:           # scattered pages, one of them twice
                    at = rng.choice(pages, 5, replace=False)
                    at = np.concatenate([at, at[:1]])
                    rows = rng.integers(0, 256, (6, size), dtype=np.uint8)
                    body = np.asarray(at, "<u8").tobytes() + rows.tobytes()
                    log.append_many(SCATTER, rid, [(len(at), body)])
                    for k, p in enumerate(at):
                        oracle[rid][p] = rows[k]
            log.commit(c, {"c": c})
            images[c] = {rid: a.copy() for rid, a in oracle.items()}
    scan = scan_log(path)
    for asked in (None, 5):
        image = committed_image(scan, asked)
        want = images[asked or 11]
        assert image.checkpoint_id == (asked or 11) and image.info == {"c": asked or 11}
        for rid, limit in ((0, nbytes), (1, 8 * size)):   # the regions' bytes (not a page's
            held = np.repeat(image.present[rid], size)[:limit]   # padding past the end)
            np.testing.assert_array_equal(image.rows[rid].reshape(-1)[:limit][held],
                                          want[rid].reshape(-1)[:limit][held])
        assert image.rows[0][3][0] != 7 or image.present[0][3]   # the first layout's page is not in it


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_base_image_read_in_groups_restores_every_region(tmp_path, monkeypatch, backend):
    """The base image reads host-listed regions whole, a group at a time with one wait
    (WHOLE_READ_BYTES): regions of odd sizes, some in a group of their own, some of zeros,
    all restore exactly, and the zero pages are left out of the log."""
    import concordia.handlers.checkpointer as cp
    from concordia.handlers.scanners import KVBlockScanner
    monkeypatch.setattr(cp, "WHOLE_READ_BYTES", 20000)
    rt = Runtime(backend)
    rng = np.random.default_rng(3)
    sizes = [4096, 1000, 12288, 8, 30000, 2048]
    arrays = [rng.standard_normal(n).astype(np.float32) if k % 3 else np.zeros(n, np.float32)
              for k, n in enumerate(sizes)]
    regions = {f"r{k}": rt.to_device(a) for k, a in enumerate(arrays)}
    scanner = KVBlockScanner((1, 1, 1, 1, 1, 256), 4, 1024)   # host-listed: no shadow
    ck = Checkpointer(rt, regions, str(tmp_path / "b.clog"), page_size=1024,
                      scanners={name: scanner for name in regions})
    stats = ck.checkpoint()
    ck.close()
    assert stats.full and stats.bytes == sum(a.nbytes for k, a in enumerate(arrays) if k % 3)
    got = Checkpointer.restore(str(tmp_path / "b.clog"), Runtime("reference"))
    for k, a in enumerate(arrays):
        np.testing.assert_array_equal(got[f"r{k}"].numpy(), a)

"""DeltaLog: the append-only checkpoint log. Its format is defined here, in one place.

File  = Header, then Records.
Header (64 bytes, little-endian):
    magic     8s   b"CCDLOG\\r\\n"   (\\r\\n catches text-mode mangling)
    version   u16  FORMAT_VERSION; a newer file is refused, never guessed at
    reserved  u16
    hsize     u32  64
    salt      u64  random per file: records of another log never chain into this one
    created   f64  unix time
    reserved  28s  zeros
    crc       u32  CRC32C of the 60 bytes before it
Record (32-byte head + payload):
    kind      u16  LAYOUT=1, PAGE=2, COMMIT=3, PAGES=4 (format v2), SCATTER=5 (format v3)
    reserved  u16
    length    u32  payload bytes
    seq       u64  previous record's seq + 1 (first record: 1)
    region    u32  region id (PAGE), else 0
    crc       u32  CRC32C over (previous record's crc or the salt) + head without crc + payload
    page      u64  page index (PAGE), first page index (PAGES), page count (SCATTER),
                   checkpoint id (COMMIT), else 0
    region    is the region id for PAGE, PAGES and SCATTER
Payloads: LAYOUT = JSON of the regions; PAGE = the page's bytes; PAGES = a run of consecutive
pages back to back (page_size bytes each; only the region's last page may be shorter), so
that a base image is a few thousand records instead of one per page (reading a log is a loop
over records); SCATTER = n page indices (u64 each), then those n whole pages back to back:
the pages of a delta that are not consecutive (a KV cache's new rows, one per head and
layer) in one record instead of one each; COMMIT = JSON with the checkpoint's per-region
SHA-256 and record count. A base image (a full checkpoint, after its LAYOUT record) leaves
out the pages that are all zeros (format v4): a region's image starts as zeros, and the
base's COMMIT says `"sparse": true`, so the fold counts every page of every region as held
(a Hugging Face StaticCache is zeros past the prompt: its base image was 5-17x larger than
its data). An older file is read as before and appended to with what its version knows:
PAGE records only in a v1 file, no SCATTER records in a v2 file, every page of a base
image in a v3 file.

Rules (etcd WAL / Redis AOF): a record counts only if its CRC chain holds; a checkpoint
counts only once its COMMIT does. Where reading stops, the damage is one of two kinds:
- a *torn tail*: an incomplete or checksum-failing record after which the file holds nothing
  that parses as a record (zeros, or nothing at all). It is the normal result of a crash
  during an append. Recovery uses the last commit before it; opening the log for append cuts
  it (and any sound but uncommitted records) off, after saving the cut bytes in
  `<log>.broken` (or `<log>.broken.1`, ...).
- *corruption*: damage followed by data that still parses as records (a flipped byte in an
  old page, a duplicated or lost record). Committed checkpoints lie beyond it, so nothing is
  guessed: restoring and opening for append both refuse with a LogError naming the file, the
  byte offset and the checkpoint the damaged record belongs to. `concordia log repair FILE
  [--to-checkpoint N]` is the explicit choice (backup first, then cut at the last sound commit
  or at N); `Checkpointer.restore(path, rt, checkpoint=N)` restores a sound older commit.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
import time
from dataclasses import dataclass, field

import crc32c
import numpy as np

from concordia_ir.errors import ConcordiaError, LogError

from .durable import atomic_writer, copy_new, replace_atomically, truncate_durably, write_new

MAGIC = b"CCDLOG\r\n"
FORMAT_VERSION = 4
HEADER = struct.Struct("<8sHHIQd28s")      # + u32 crc
HEADER_SIZE = HEADER.size + 4              # 64
RECORD = struct.Struct("<HHIQI")           # kind, reserved, length, seq, region (+ crc u32, page u64)
RECORD_SIZE = RECORD.size + 4 + 8          # 32
_CRC_INPUT = struct.Struct("<IHHIQIQ")     # previous crc, then RECORD's fields, then page
_RECORD_HEAD = struct.Struct("<HHIQIIQ")   # RECORD's fields, crc, page: a record's 32-byte head
LAYOUT, PAGE, COMMIT, PAGES, SCATTER = 1, 2, 3, 4, 5
KIND_NAMES = {LAYOUT: "layout", PAGE: "page", COMMIT: "commit", PAGES: "pages", SCATTER: "scatter"}
PAGE_KINDS = (PAGE, PAGES, SCATTER)
RUN_PAGES = 256   # pages in a PAGES record at most (1 MiB of 4 KiB pages)
FSYNC_POLICIES = ("always", "everysec", "no")
MAX_PAYLOAD = 1 << 30


@dataclass
class Record:
    kind: int
    seq: int
    region: int
    page: int
    payload: bytes
    offset: int
    crc: int


@dataclass
class Scan:
    """What a read of the log found: sound records, commits, and where (and why) it stopped."""
    path: str
    salt: int
    created: float
    version: int = FORMAT_VERSION
    records: list[Record] = field(default_factory=list)
    commit_ends: list[int] = field(default_factory=list)   # index in records after each COMMIT
    end: int = HEADER_SIZE           # byte offset just after the last sound record
    committed_end: int = HEADER_SIZE  # byte offset just after the last COMMIT
    problem: str | None = None       # why reading stopped before the end of the file
    problem_offset: int | None = None
    file_size: int = 0
    torn: bool = False               # the damage is a torn tail (nothing parses after it)
    later_commits: list[int] = field(default_factory=list)   # checkpoint ids found past damage
    damaged_checkpoint: int | None = None   # the checkpoint the damaged record belongs to

    @property
    def last_crc(self) -> int:
        return self.records[-1].crc if self.records else self.salt & 0xFFFFFFFF

    @property
    def corrupt(self) -> bool:
        """Damage with records after it: refused, never silently cut."""
        return self.problem is not None and not self.torn

    @property
    def checkpoint_ids(self) -> list[int]:
        return [self.records[i - 1].page for i in self.commit_ends]

    @property
    def last_checkpoint(self) -> int:
        return self.records[self.commit_ends[-1] - 1].page if self.commit_ends else 0

    def commit_index(self, checkpoint_id: int) -> int:
        """Index in `records` just after the COMMIT of `checkpoint_id` (a sound commit)."""
        for i in self.commit_ends:
            if self.records[i - 1].page == checkpoint_id:
                return i
        raise LogError(self.path, self.end, f"checkpoint {checkpoint_id} is not among the sound "
                                            f"commits ({_id_range(self.checkpoint_ids)})")

    def commit_end_offset(self, checkpoint_id: int) -> int:
        """Byte offset just after the COMMIT of `checkpoint_id` (a sound commit)."""
        r = self.records[self.commit_index(checkpoint_id) - 1]
        return r.offset + RECORD_SIZE + len(r.payload)

    def corruption_error(self) -> "LogError":
        later = (f"; the commits of checkpoints {_id_range(self.later_commits)} follow it"
                 if self.later_commits else "")
        keep = (f"checkpoint {self.last_checkpoint}" if self.commit_ends else "nothing")
        return LogError(self.path, self.problem_offset,
                        f"{self.problem} in a record of checkpoint {self.damaged_checkpoint}"
                        f"{later}: corrupt mid-file, not a torn tail, so nothing was cut; run "
                        f"`concordia log repair {self.path}` to keep {keep} (a backup is made "
                        f"first), or restore an older commit with checkpoint=N")


def _id_range(ids: list[int]) -> str:
    if not ids:
        return "none"
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"


def _record_crc(prev: int, head: bytes, page: int, payload: bytes) -> int:
    c = crc32c.crc32c(struct.pack("<I", prev))
    c = crc32c.crc32c(head, c)
    c = crc32c.crc32c(struct.pack("<Q", page), c)
    return crc32c.crc32c(payload, c)


def write_record(write, prev: int, kind: int, seq: int, region: int, page: int, *parts) -> int:
    """One record, chained after the crc `prev`, through `write` (a file's write): its head,
    then its payload's `parts` (bytes-like, one byte an item) as they are, with no copy; two
    CRC calls and a write a part. Returns its crc. Every writer of records goes through here
    (the CRC input prev|head|page is packed at once: the same bytes _record_crc reads)."""
    size = sum(len(part) for part in parts)
    crc = crc32c.crc32c(_CRC_INPUT.pack(prev, kind, 0, size, seq, region, page))
    for part in parts:
        crc = crc32c.crc32c(part, crc)
    write(_RECORD_HEAD.pack(kind, 0, size, seq, region, crc, page))
    for part in parts:
        write(part)
    return crc


def encode_header(salt: int, created: float) -> bytes:
    body = HEADER.pack(MAGIC, FORMAT_VERSION, 0, HEADER_SIZE, salt, created, b"\0" * 28)
    return body + struct.pack("<I", crc32c.crc32c(body))


def read_header(path: str, data: bytes) -> tuple[int, float, int]:
    """(salt, created, format version) of a log's header; a bad or newer one is refused."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise LogError(path, 0, "not a Concordia delta log (bad magic)")
    if len(data) < HEADER_SIZE:
        raise LogError(path, len(data), "header is truncated")
    magic, version, _, hsize, salt, created, _ = HEADER.unpack_from(data)
    (crc,) = struct.unpack_from("<I", data, HEADER.size)
    if version > FORMAT_VERSION:
        raise LogError(path, 8, f"written by a newer Concordia (format v{version}; this one "
                                f"reads up to v{FORMAT_VERSION}); upgrade to read it")
    if crc != crc32c.crc32c(data[:HEADER.size]) or hsize != HEADER_SIZE:
        raise LogError(path, HEADER.size, "header checksum mismatch (corrupt header)")
    return salt, created, version


def _map(path: str):
    """The file's bytes, mapped read-only rather than read: reading copied every byte once
    more (0.165 of a 0.18 s scan of a 263 MB log on the CPU box), and the CRCs read them
    anyway. Page payloads are views of the mapping; compaction replaces the file by rename,
    so a mapping stays whole."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""


def scan_log(path: str, end: int | None = None) -> Scan:
    """Read a whole log (or its first `end` bytes); never raises for damage after the header
    (see Scan.problem)."""
    try:
        data = _map(path)
    except FileNotFoundError:
        raise ConcordiaError(f"{path}: no such log") from None
    except OSError as e:
        raise ConcordiaError(f"{path}: cannot read: {e.strerror}") from None
    if end is not None:
        data = memoryview(data)[:end]
    salt, created, version = read_header(path, data)
    scan = Scan(path, salt, created, version, file_size=len(data))
    pos, seq = HEADER_SIZE, 0
    reader = read_records(data, HEADER_SIZE, salt & 0xFFFFFFFF, 0)
    for rec, rec_end in reader:
        scan.records.append(rec)
        if rec.kind == COMMIT:
            scan.commit_ends.append(len(scan.records))
            scan.committed_end = rec_end
        pos, seq = rec_end, rec.seq
        scan.end = rec_end
    scan.problem = reader.problem
    if scan.problem is not None:
        scan.problem_offset = pos
        _classify_damage(scan, bytes(data) if isinstance(data, memoryview) else data, pos, seq)
    return scan


class read_records:
    """(Record, end offset) of each record from `pos` of `data` whose CRC chain (from `prev`)
    and sequence (from `seq`) hold; where they stop holding, `problem` says why."""

    def __init__(self, data, pos: int, prev: int, seq: int):
        self.data, self.pos, self.prev, self.seq = data, pos, prev, seq
        self.problem: str | None = None

    def __iter__(self):
        data, pos, prev, seq = self.data, self.pos, self.prev, self.seq
        view = memoryview(data)   # page payloads are views of the file's bytes, not copies
        while pos < len(data):
            if len(data) - pos < RECORD_SIZE:
                self.problem = f"torn tail: {len(data) - pos} bytes of an incomplete record header"
                return
            kind, _, length, rseq, region = RECORD.unpack_from(data, pos)
            crc, page = struct.unpack_from("<IQ", data, pos + RECORD.size)
            if kind not in KIND_NAMES or length > MAX_PAYLOAD:
                self.problem = f"bad record header (kind {kind}, length {length})"
                return
            end = pos + RECORD_SIZE + length
            if end > len(data):
                self.problem = f"torn tail: record of {length} payload bytes is cut short"
                return
            payload = view[pos + RECORD_SIZE:end]
            if _record_crc(prev, view[pos:pos + RECORD.size], page, payload) != crc:
                self.problem = "checksum mismatch (corrupt, reordered or foreign record)"
                return
            if rseq != seq + 1:
                self.problem = f"sequence {rseq} follows {seq} (duplicated or missing record)"
                return
            yield Record(kind, rseq, region, page,
                         payload if kind in PAGE_KINDS else bytes(payload), pos, crc), end
            pos, prev, seq = end, crc, rseq


_RECORD_START = re.compile(rb"[\x01-\x05]\x00\x00\x00")   # kind (u16) then reserved (u16) = 0


def _records_after(data: bytes, pos: int, seq: int) -> list[tuple[int, int, int, int]]:
    """(offset, kind, seq, page) of what still parses as records past damage at `pos`: a head
    with a known kind, a sequence number above `seq` and a payload that fits the file. Once
    one is found, the following records are read by their lengths (payload bytes are not
    searched); when that chain breaks, the search resumes after the record it broke on."""
    found, limit = [], seq + 1 + (len(data) - pos) // RECORD_SIZE
    hit = _RECORD_START.search(data, pos + 1)
    while hit is not None:
        q = hit.start()
        while q + RECORD_SIZE <= len(data):
            kind, reserved, length, rseq, _ = RECORD.unpack_from(data, q)
            end = q + RECORD_SIZE + length
            if kind not in KIND_NAMES or reserved or not seq < rseq <= limit or end > len(data):
                break
            found.append((q, kind, rseq, struct.unpack_from("<Q", data, q + RECORD.size + 4)[0]))
            seq, q = rseq, end
        hit = _RECORD_START.search(data, q + 1)
    return found


def _classify_damage(scan: Scan, data: bytes, pos: int, seq: int) -> None:
    """Torn tail or corruption (see the module's rules), and which checkpoint was hit."""
    later = _records_after(data, pos, seq)
    scan.torn = not later
    scan.later_commits = [page for _, kind, _, page in later if kind == COMMIT]
    scan.damaged_checkpoint = (scan.later_commits[0] if scan.later_commits
                               else scan.last_checkpoint + 1)


WRITE_BUFFER = 4 << 20   # a checkpoint's records reach the file in a few large writes


class DeltaLog:
    """Appends records; `commit()` makes a checkpoint durable according to the fsync policy:
    always (fsync at every commit: nothing committed is lost), everysec (a background fsync
    each second: up to ~1 s of commits can be lost), no (the OS decides)."""

    def __init__(self, path: str, fsync: str = "always"):
        if fsync not in FSYNC_POLICIES:
            raise ConcordiaError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.path, self.fsync = path, fsync
        self._lock = threading.Lock()
        self._dirty = False
        self.cut_backup: str | None = None   # where a cut torn tail was saved, if one was
        if os.path.exists(path) and os.path.getsize(path) > 0:
            scan = scan_log(path)
            if scan.corrupt:
                raise scan.corruption_error()
            self.salt = scan.salt
            keep = scan.commit_ends[-1] if scan.commit_ends else 0
            self.seq = scan.records[keep - 1].seq if keep else 0
            self.prev_crc = scan.records[keep - 1].crc if keep else scan.salt & 0xFFFFFFFF
            if scan.committed_end < scan.file_size:   # the torn / uncommitted tail
                self.cut_backup = cut_tail(path, scan.committed_end)
            self.fh = open(path, "r+b", buffering=WRITE_BUFFER)
            self.fh.seek(scan.committed_end)
            self.layout = _layout_of(scan, keep)
            self.last_checkpoint = scan.last_checkpoint
            self.runs = scan.version >= 2      # a v1 file gets no PAGES records
            self.scatter = scan.version >= 3   # a v2 file no SCATTER records
            self.sparse = scan.version >= 4    # a v3 file's base images hold every page
        else:
            self.salt = int.from_bytes(os.urandom(8), "little")
            self.seq, self.prev_crc = 0, self.salt & 0xFFFFFFFF
            # Created whole or not at all: a crash here must not leave a headerless log.
            try:
                replace_atomically(path, encode_header(self.salt, time.time()))
            except OSError as e:   # a user's path: one line, not the temp file's traceback
                raise ConcordiaError(f"{path}: cannot create the log: {e.strerror}") from None
            self.fh = open(path, "r+b", buffering=WRITE_BUFFER)
            self.fh.seek(0, os.SEEK_END)
            self.layout = None
            self.last_checkpoint = 0
            self.runs = self.scatter = self.sparse = True
        self._start()

    def _start(self):
        # where the file was last made whole (flushed, synced per policy): offset, seq, crc
        self.synced = (self.fh.tell(), self.seq, self.prev_crc)
        self._stop = threading.Event()
        self._syncer = None
        if self.fsync == "everysec":
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True)
            self._syncer.start()

    @classmethod
    def continuing(cls, path: str, fsync: str, salt: int, seq: int, prev_crc: int,
                   layout: dict | None, last_checkpoint: int) -> "DeltaLog":
        """A log this process has just written whole and made durable (a compaction's new
        file), opened for append at its end from the chain state it left, without reading it
        again."""
        self = cls.__new__(cls)
        self.path, self.fsync, self._lock, self._dirty = path, fsync, threading.Lock(), False
        self.cut_backup, self.salt, self.seq, self.prev_crc = None, salt, seq, prev_crc
        self.fh = open(path, "r+b", buffering=WRITE_BUFFER)
        self.fh.seek(0, os.SEEK_END)
        self.layout, self.last_checkpoint = layout, last_checkpoint
        self.runs = self.scatter = self.sparse = True
        self._start()
        return self

    def append(self, kind: int, payload: bytes, region: int = 0, page: int = 0) -> None:
        self.append_many(kind, region, ((page, payload),))

    def append_many(self, kind: int, region: int, items) -> int:
        """Append (page, payload) records of one kind and region; returns how many. Head and
        payload are written separately into the file's buffer: no copy of the payload."""
        return self._append_records((kind, region, page, (payload,)) for page, payload in items)

    def _append_records(self, records) -> int:
        """(kind, region, page, payload parts) records chained on under one lock: the one
        place the log's chain (seq, crc) moves. Returns how many."""
        n = 0
        with self._lock:
            write, prev, seq = self.fh.write, self.prev_crc, self.seq
            for kind, region, page, parts in records:
                seq += 1
                prev = write_record(write, prev, kind, seq, region, page, *parts)
                n += 1
            self.prev_crc, self.seq = prev, seq
            self._dirty = True
        return n

    def append_pages(self, region: int, page_size: int, items, longest: int = RUN_PAGES) -> int:
        """Append a region's (page, bytes) items, in page order: consecutive pages as PAGES
        records and the rest as SCATTER records (page_runs), one record each in a v1 file.
        Returns the pages appended."""
        if not self.runs:
            return self.append_many(PAGE, region, items)
        n = 0
        for kind, first, payload in page_runs(items, page_size, longest, self.scatter):
            self.append_many(kind, region, ((first, payload),))
            n += pages_in(kind, payload, page_size)
        return n

    def append_scatter(self, region: int, page_size: int, pages: np.ndarray, rows: np.ndarray,
                       longest: int = RUN_PAGES) -> int:
        """Append whole pages given as arrays: `pages` (n page indices, none twice) and `rows`
        (n x page_size bytes, row k holding page pages[k]), as SCATTER records of up to
        `longest` pages, with no Python per page (a checkpoint writer's staging, as the device
        left it). A file older than v3 gets them through append_pages. Returns n."""
        n = len(pages)
        if not self.scatter or n < 2:
            return self.append_pages(region, page_size, sorted(
                zip(pages.tolist(), (rows[k] for k in range(n)))))
        index = np.asarray(pages, "<u8")
        self._append_records(
            (SCATTER, region, min(longest, n - at),
             (index[at:at + longest].view(np.uint8), rows[at:at + longest].reshape(-1)))
            for at in range(0, n, longest))
        return n

    def append_scatters(self, page_size: int, parts: list, longest: int = RUN_PAGES) -> int:
        """append_scatter for several regions' arrays, `parts` of (region, pages, rows), under
        one lock: a SCATTER record each, and no Python per page or call per region beyond the
        record's own (the Hugging Face guard appends 58 regions a token). Returns the pages
        appended."""
        if not self.scatter or any(not 2 <= len(p) <= longest for _, p, _ in parts):
            return sum(self.append_scatter(region, page_size, pages, rows, longest)
                       for region, pages, rows in parts)
        self._append_records(
            (SCATTER, region, len(pages), (np.asarray(pages, "<u8").view(np.uint8), rows.reshape(-1)))
            for region, pages, rows in parts)
        return sum(len(p) for _, p, _ in parts)

    def append_base(self, region: int, page_size: int, pieces, end: int) -> tuple[int, int]:
        """Part of a base image from arrays: `pieces` of (first page, raw), raw holding whole
        pages from that page on, back to back; `end` is the region's size in bytes (its last
        page may be short). The pages that are not all zeros go in (the zeros left out: the
        module docstring; all of them in a v3 file, one PAGE record each in a v1 file), with
        no Python per page: as PAGES runs, or, where they lie in many short stretches (a
        StaticCache's written rows, one stretch a head: 8 records a region of the guard's
        base where one holds them), as SCATTER records. Returns (pages, bytes) appended."""
        pieces = [(int(first), raw.reshape(-1).view(np.uint8)) for first, raw in pieces]
        if self.scatter and self.sparse and pieces:
            scattered = _scattered_base(pieces, page_size, end)
            if scattered is not None:
                index, rows = scattered
                self._append_records(
                    (SCATTER, region, len(index[at:at + RUN_PAGES]),
                     (index[at:at + RUN_PAGES].view(np.uint8), rows[at:at + RUN_PAGES].reshape(-1)))
                    for at in range(0, len(index), RUN_PAGES))
                return len(index), rows.nbytes
        n, runs = 0, []
        for first, raw in pieces:
            keep = _nonzero_rows(raw, page_size) if self.sparse else np.ones(len(raw) // page_size, bool)
            inside = raw[:end - first * page_size]   # raw's bytes inside the region
            n += int(keep.sum())
            runs += [(kind, first + page, payload) for kind, page, payload
                     in page_runs_of(inside, keep, page_size, RUN_PAGES if self.runs else 1)]
        self._append_records((kind, region, page, (payload,)) for kind, page, payload in runs)
        return n, sum(len(p) for _, _, p in runs)

    def write_layout(self, layout: dict) -> None:
        self.append(LAYOUT, json.dumps(layout, sort_keys=True).encode())
        self.layout = layout

    def commit_info(self, checkpoint_id: int, pages: int, nbytes: int, full: bool, backend: str,
                    asynchronous: bool = False) -> dict:
        """A checkpoint's COMMIT payload: its id, pages and bytes, whether it is a base image,
        when, from which backend, and whether a writer thread logged it; a base image says
        "sparse" where this file's base images leave their pages of zeros out (format v4: the
        module docstring)."""
        info = {"checkpoint": checkpoint_id, "pages": pages, "bytes": nbytes, "full": full,
                "time": time.time(), "backend": backend}
        if asynchronous:
            info["async"] = True
        if full and self.sparse:
            info["sparse"] = True
        return info

    def commit(self, checkpoint_id: int, info: dict, sync: bool = True) -> None:
        """Append the commit record; with fsync=always it is durable on return, unless `sync`
        is False: then the caller makes a group of commits durable with one sync()."""
        self.append(COMMIT, json.dumps(info, sort_keys=True).encode(), page=checkpoint_id)
        if sync:
            self.sync()

    def sync(self) -> None:
        """Every commit so far reaches the file (and, with fsync=always, the disk)."""
        with self._lock:
            self.fh.flush()
            if self.fsync == "always":
                os.fsync(self.fh.fileno())
                self._dirty = False
            self.synced = (self.fh.tell(), self.seq, self.prev_crc)

    def _sync_loop(self):
        while not self._stop.wait(1.0):
            with self._lock:
                if self._dirty and not self.fh.closed:
                    self.fh.flush()
                    os.fsync(self.fh.fileno())
                    self._dirty = False

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if not self.fh.closed:
                self.fh.flush()
                if self.fsync != "no":
                    os.fsync(self.fh.fileno())
                self.fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def backup_path(path: str, suffix: str) -> str:
    """`<path><suffix>`, or the first free `<path><suffix>.N`: earlier backups are kept."""
    cand, n = f"{path}{suffix}", 0
    while os.path.exists(cand):
        n += 1
        cand = f"{path}{suffix}.{n}"
    return cand


def cut_tail(path: str, at: int, backup: str = ".broken") -> str:
    """Truncate the log at byte `at`, after saving the bytes cut off (durably) beside it.
    Returns the backup's path."""
    with open(path, "rb") as fh:
        fh.seek(at)
        cut = fh.read()
    saved = backup_path(path, backup)
    write_new(saved, cut)
    truncate_durably(path, at)
    return saved


@dataclass
class Repair:
    """What `repair` did: the backup of the whole file, the cut, what was kept and dropped."""
    backup: str
    cut_at: int
    kept_checkpoint: int
    dropped_commits: list[int]
    dropped_bytes: int
    problem: str | None


def repair(path: str, to_checkpoint: int | None = None) -> Repair:
    """The explicit choice for a damaged log: copy the whole file to `<path>.bak` (or
    `.bak.N`), then cut it just after the last sound commit, or after `to_checkpoint`."""
    scan = scan_log(path)
    if not scan.commit_ends:
        raise LogError(path, HEADER_SIZE, "the log holds no sound commit to keep; nothing to "
                                          "repair to (restore from another copy)")
    keep = scan.last_checkpoint if to_checkpoint is None else to_checkpoint
    cut_at = scan.commit_end_offset(keep)
    ids = scan.checkpoint_ids
    dropped = ids[ids.index(keep) + 1:] + scan.later_commits
    saved = backup_path(path, ".bak")
    size = copy_new(path, saved)
    if cut_at < size:
        truncate_durably(path, cut_at)
    return Repair(saved, cut_at, keep, dropped, size - cut_at, scan.problem)


def _layout_of(scan: Scan, upto: int) -> dict | None:
    layout = None
    for r in scan.records[:upto]:
        if r.kind == LAYOUT:
            layout = json.loads(r.payload)
    return layout


@dataclass
class CommittedImage:
    """The regions' bytes as of a commit. Each region's pages are the rows of one array (row p
    holds page p; past the region's end, zeros), filled record by record, newest first, each
    page from the last record that holds it: a page costs no Python, so a log of a million
    pages folds in one pass."""
    layout: dict
    rows: dict[int, np.ndarray]      # region id -> (pages, page_size) uint8
    present: dict[int, np.ndarray]   # region id -> bool per page: the log held it
    checkpoint_id: int
    info: dict


def committed_image(scan: Scan, checkpoint: int | None = None) -> CommittedImage:
    """Fold the log up to its last COMMIT (or up to the COMMIT of `checkpoint`) into one
    image (later pages win). A corrupt log is refused unless an older sound checkpoint is
    asked for by id: later commits are never dropped silently."""
    if scan.corrupt and checkpoint is None:
        raise scan.corruption_error()
    if not scan.commit_ends:
        where = scan.problem_offset if scan.problem is not None else scan.end
        why = f" ({scan.problem})" if scan.problem else ""
        raise LogError(scan.path, where, f"the log holds no committed checkpoint{why}")
    upto = scan.commit_ends[-1] if checkpoint is None else scan.commit_index(checkpoint)
    records = scan.records[:upto]
    # the image starts at the last layout record (a new layout: a new base image follows);
    # folded newest first, a page is copied once, from the last record that holds it, and
    # the rest of the log is only looked at: a log several times its live state folds in
    # about the time of one copy of that state
    start = next((i for i in range(len(records) - 1, -1, -1) if records[i].kind == LAYOUT), None)
    if start is None:
        raise LogError(scan.path, HEADER_SIZE, "no layout record before the first commit")
    layout = json.loads(records[start].payload)
    size = layout["page_size"]
    rows = {d["id"]: np.zeros((-(-d["nbytes"] // size), size), np.uint8) for d in layout["regions"]}
    present = {rid: np.zeros(len(a), bool) for rid, a in rows.items()}
    info, ckpt, sparse = {}, 0, None
    for r in records[start + 1:]:
        if r.kind in PAGE_KINDS and r.region not in rows:
            raise LogError(scan.path, r.offset, f"a {KIND_NAMES[r.kind]} record of region "
                           f"{r.region}, which the layout before it does not hold")
        if r.kind == COMMIT:
            info, ckpt = json.loads(r.payload), r.page
            sparse = info.get("sparse", False) if sparse is None else sparse   # the base's
    for r in reversed(records[start + 1:]):
        if r.kind in PAGE_KINDS:
            _fold_under(scan.path, r, rows[r.region], present[r.region], size)
    if sparse:   # the base left out its pages of zeros: the rows hold zeros there already
        for held in present.values():
            held[:] = True
    return CommittedImage(layout, rows, present, ckpt, info)


def _fold_under(path: str, r: Record, rows: np.ndarray, present: np.ndarray, size: int) -> None:
    """One page record's pages into a region's rows where no later record put them (the fold
    goes newest first): only those pages are copied."""
    data = np.frombuffer(r.payload, np.uint8)
    try:
        if r.kind == SCATTER:
            at = np.frombuffer(r.payload[:8 * r.page], "<u8").astype(np.int64)
            # a page twice in one record: its last entry is the newer one
            at, last = np.unique(at[::-1], return_index=True)
            k = r.page - 1 - last
            fresh = ~present[at]
            if not fresh.any():
                return
            rows[at[fresh]] = data[8 * r.page:].reshape(r.page, size)[k[fresh]]
            present[at[fresh]] = True
            return
        n = -(-len(data) // size)
        if r.page + n > len(rows):
            raise IndexError
        fresh = ~present[r.page:r.page + n]
        if fresh.all():
            rows.reshape(-1)[r.page * size:r.page * size + len(data)] = data
        elif fresh.any():
            whole = len(data) // size
            k = np.flatnonzero(fresh[:whole])
            rows[r.page + k] = data[:whole * size].reshape(whole, size)[k]
            if n > whole and fresh[-1]:   # a short last page (the region's end)
                rows[r.page + whole, :len(data) - whole * size] = data[whole * size:]
        present[r.page:r.page + n] = True
    except (IndexError, ValueError):
        raise LogError(path, r.offset, f"a {KIND_NAMES[r.kind]} record's pages lie outside "
                       f"its region ({len(rows)} pages)") from None


def split_run(record: Record, page_size: int):
    """(page index, bytes) of each page of a PAGES or SCATTER record (views, not copies)."""
    p = record.payload
    if record.kind == SCATTER:
        n = record.page
        at = np.frombuffer(p[:8 * n], "<u8")
        return ((int(at[k]), p[8 * n + k * page_size:8 * n + (k + 1) * page_size]) for k in range(n))
    return ((record.page + k, p[at:at + page_size])
            for k, at in enumerate(range(0, len(p), page_size)))


def pages_in(kind: int, payload, page_size: int) -> int:
    """How many pages a PAGE, PAGES or SCATTER record holds."""
    if kind == SCATTER:
        return len(payload) // (8 + page_size)
    return 1 if kind == PAGE else -(-len(payload) // page_size)


def page_runs(items, page_size: int, longest: int = RUN_PAGES, scatter: bool = False):
    """(kind, page, payload) records for (page, bytes) items in page order: consecutive whole
    pages joined into PAGES records of up to `longest` pages; with `scatter`, the lone whole
    pages left over gathered into SCATTER records of up to `longest` (page = their count),
    after the runs; any other page alone as PAGE."""
    run: list = []
    lone: list = []

    def flush():
        if len(run) > 1:
            return (PAGES, run[0][0], b"".join(d for _, d in run))
        if scatter and len(run[0][1]) == page_size:
            lone.append(run[0])
            return None
        return (PAGE, run[0][0], run[0][1])
    for page, data in items:
        if run and (page != run[-1][0] + 1 or len(run[-1][1]) != page_size
                    or len(run) == longest):
            rec = flush()
            if rec:
                yield rec
            run = []
        run.append((page, data))
    if run and (rec := flush()):
        yield rec
    for at in range(0, len(lone), longest):
        group = lone[at:at + longest]
        if len(group) == 1:
            yield (PAGE, group[0][0], group[0][1])
        else:
            yield (SCATTER, len(group), np.array([p for p, _ in group], "<u8").tobytes()
                   + b"".join(d for _, d in group))


def compact(path: str, fsync: bool = True) -> int:
    """Rewrite the log as one base image (layout + every page + commit). The new file is
    written beside the old, fsynced, then renamed over it: a crash leaves one or the other.
    Returns the new size in bytes."""
    image = committed_image(scan_log(path))
    with atomic_writer(path, fsync) as fh:
        write_base(fh, image)
    return os.path.getsize(path)


def write_base(fh, image: CommittedImage) -> tuple[int, int, int]:
    """A new log holding `image` as one base image (header, layout, its pages as runs, the
    commit) into the open file `fh`; returns its chain state (salt, seq, crc) for appends."""
    salt = int.from_bytes(os.urandom(8), "little")
    size = image.layout["page_size"]
    fh.write(encode_header(salt, time.time()))
    prev, seq = salt & 0xFFFFFFFF, 0
    items = [(LAYOUT, 0, 0, json.dumps(image.layout, sort_keys=True).encode())]
    for desc in sorted(image.layout["regions"], key=lambda d: d["id"]):
        rid = desc["id"]
        flat = image.rows[rid].reshape(-1)[:desc["nbytes"]]
        held = image.present[rid] & image.rows[rid].any(axis=1)   # zeros left out (sparse)
        items += [(kind, rid, first, payload)
                  for kind, first, payload in page_runs_of(flat, held, size, RUN_PAGES)]
    info = {**image.info, "compacted": True, "sparse": True}
    items.append((COMMIT, 0, image.checkpoint_id, json.dumps(info, sort_keys=True).encode()))
    for kind, rid, pg, payload in items:
        seq += 1
        prev = write_record(fh.write, prev, kind, seq, rid, pg, payload)
    return salt, seq, prev


def page_runs_of(flat, keep: np.ndarray, page_size: int, longest: int) -> list:
    """(kind, first page, payload) records for the pages of `flat` (a region's bytes from a
    page boundary on, its end trimmed: the last page may be short) where `keep` holds: runs of
    up to `longest` pages as PAGES, a lone page as PAGE (a base image's, a compaction's)."""
    return [(PAGES if b - a > 1 else PAGE, a, flat[a * page_size:b * page_size])
            for a, b in _stretches(keep, longest)]


def _nonzero_rows(raw: np.ndarray, page_size: int) -> np.ndarray:
    """Which whole pages of `raw` (bytes) hold anything but zeros, found 8 bytes at a time
    (page sizes are powers of two >= 4)."""
    wide = raw.view(np.uint64) if raw.nbytes % 8 == 0 and page_size % 8 == 0 else raw
    return wide.reshape(-1, page_size // wide.itemsize).any(axis=1)


def _scattered_base(pieces: list, page_size: int, end: int, mean_pages: int = 64):
    """A base's pieces as SCATTER rows, (page indices, rows), where their pages that are not
    all zeros lie in several stretches of fewer than `mean_pages` pages on average (a record
    each as runs; a SCATTER record holds RUN_PAGES of them); else None. Every numpy call is
    one for all the pieces (the guard's base: 8 a region, 450 in all)."""
    sizes = np.array([len(raw) // page_size for _, raw in pieces])
    firsts = np.array([first for first, _ in pieces])
    if int((firsts + sizes).max()) * page_size > end:   # the region's short last page: runs
        return None
    raw = pieces[0][1] if len(pieces) == 1 else np.concatenate([r for _, r in pieces])
    keep = _nonzero_rows(raw, page_size)
    pages = np.arange(len(keep)) + np.repeat(firsts - (np.cumsum(sizes) - sizes), sizes)
    starts = keep.copy()   # a stretch starts where the page before is not kept or not next
    starts[1:] &= ~keep[:-1] | (pages[1:] != pages[:-1] + 1)
    n_starts, kept = int(np.count_nonzero(starts)), int(np.count_nonzero(keep))
    if n_starts < 2 or kept >= mean_pages * n_starts:
        return None
    at = np.flatnonzero(keep)
    return pages[at].astype("<u8"), raw.reshape(-1, page_size)[at]


def _stretches(present: np.ndarray, longest: int):
    """[first, end) of each stretch of True in `present`, cut at `longest`."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], present.astype(np.int8), [0]))))
    for first, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
        for at in range(first, end, longest):
            yield at, min(end, at + longest)

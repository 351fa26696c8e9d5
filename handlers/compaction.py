"""Compaction beside the appends (Redis's AOF rewrite): the log folds into one base image
while the checkpoint writer goes on appending to it.

A thread reads the log's durable prefix (up to `DeltaLog.synced`, which no append touches
again), folds it into a base image and writes it to `<log>.compacting`. Then it copies what
the writer appended meanwhile into the new file, each record verified on its old chain and
re-chained on the new one, in rounds, until what is left is small. The writer ends the job
between two group commits: the last few records, an fsync, and a rename over the log
(`finish`): only that much stops the appends.

A crash at any point leaves a whole log: before the rename the old one (and a stale
`.compacting` file, rewritten by the next compaction), after it the new one, which holds
every record that was durable in the old.
"""
from __future__ import annotations

import json
import os
import threading
import time

from concordia_ir.errors import LogError

from .durable import fsync_dir
from .log import (COMMIT, LAYOUT, DeltaLog, committed_image, read_records, scan_log, write_base,
                  write_record)

# appended bytes the writer copies itself at the swap at most (the rest the thread copies)
CATCH_UP_BYTES = 16 << 20
RETIRED = ".retired"   # the old log's name while its blocks are being freed
# the new file is fsynced every PACE_BYTES as it is written. Left to one fsync at the end, its
# hundreds of MB of dirty pages went into the same ext4 journal commit as the writer's next
# fsync: on the CPU box another thread's 1 MB fsync rose to p99 73-108 ms (max 163) while
# 240 MB were written at once, and to p99 13-14 ms (max 55) written this way
PACE_BYTES = 16 << 20


class _Paced:
    """A file's write(), fsyncing every PACE_BYTES bytes."""

    def __init__(self, fh):
        self.fh, self.since = fh, 0

    def write(self, data) -> int:
        n = self.fh.write(data)
        self.since += n
        if self.since >= PACE_BYTES:
            self.sync()
        return n

    def sync(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.since = 0


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:   # gone already, or left for the next compaction
        pass


class BackgroundCompaction:
    """One compaction of `log` (a DeltaLog the caller keeps appending to): started at once;
    `done` is set when the writer may `finish()` it."""

    def __init__(self, log: DeltaLog):
        self.log, self.path, self.new_path = log, log.path, log.path + ".compacting"
        self.copied, seq, prev = log.synced   # the prefix folded; the old chain's state there
        self.old_chain = (seq, prev)
        self.bytes_before, self.started = self.copied, time.perf_counter()
        self.swap_s = 0.0
        self.swap_parts: dict = {}
        self.reaper: threading.Thread | None = None   # frees the old log's blocks
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.fh = None
        self.thread = threading.Thread(target=self._run, name="concordia-compaction", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            image = committed_image(scan_log(self.path, end=self.copied))
            self.layout, self.last_checkpoint = image.layout, image.checkpoint_id
            self.fh = open(self.new_path, "wb")
            self.paced = _Paced(self.fh)
            self.salt, self.seq, self.prev = write_base(self.paced, image)
            self.paced.sync()
            while self.log.synced[0] - self.copied > CATCH_UP_BYTES:
                self._copy_tail(self.log.synced[0])
                self.paced.sync()   # here, not in finish: the swap flushes only its last records
        except BaseException as e:   # surfaced by finish(); the old log is untouched
            self.error = e
        finally:
            self.done.set()

    def _copy_tail(self, end: int) -> None:
        """The old log's records in [copied, end), verified and re-chained into the new file."""
        with open(self.path, "rb") as f:
            f.seek(self.copied)
            data = f.read(end - self.copied)
        seq, prev = self.old_chain
        reader, at = read_records(data, 0, prev, seq), 0
        for rec, at in reader:
            self.seq += 1
            self.prev = write_record(self.paced.write, self.prev, rec.kind, self.seq, rec.region,
                                     rec.page, rec.payload)
            seq, prev = rec.seq, rec.crc
            if rec.kind == LAYOUT:
                self.layout = json.loads(rec.payload)
            elif rec.kind == COMMIT:
                self.last_checkpoint = rec.page
        if at != len(data):
            raise LogError(self.path, self.copied + at, f"compaction stopped: {reader.problem}")
        self.copied, self.old_chain = end, (seq, prev)

    def finish(self) -> DeltaLog:
        """In the writer, with no append under way: the records left, fsync, rename over the
        log; returns the new log, open for append. On an error the old log stays in use (the
        caller keeps its DeltaLog) and the error is raised."""
        self.thread.join()
        t0 = time.perf_counter()
        try:
            if self.error is not None:
                raise self.error
            before = self.copied
            self._copy_tail(self.log.synced[0])
            t1 = time.perf_counter()
            self.paced.sync()
            self.fh.close()
        except BaseException:
            self.abandon()
            raise
        t2 = time.perf_counter()
        self.log.close()
        t3 = time.perf_counter()
        retired = self._retire_old()
        os.replace(self.new_path, self.path)
        fsync_dir(self.path)
        if retired:   # its blocks are freed beside the appends, not in the writer's pause
            self.reaper = threading.Thread(target=_remove_quietly, args=(retired,),
                                           name="concordia-compaction-reaper", daemon=True)
            self.reaper.start()
        self.swap_s = time.perf_counter() - t0
        # the swap's parts (where the writer's pause goes)
        self.swap_parts = {"tail_bytes": self.copied - before, "copy_s": t1 - t0,
                           "sync_s": t2 - t1, "close_old_s": t3 - t2,
                           "rename_s": time.perf_counter() - t3}
        return DeltaLog.continuing(self.path, self.log.fsync, self.salt, self.seq, self.prev,
                                   self.layout, self.last_checkpoint)

    def _retire_old(self) -> str | None:
        """A second name for the old log, so that the rename over it does not free its blocks
        (on ext4 a rename over a closed 800 MB file took 183 ms, all of it the writer's pause);
        None where the file system has no hard links. A crash leaves the second name behind:
        the next compaction removes it."""
        retired = self.path + RETIRED
        try:
            if os.path.exists(retired):
                os.remove(retired)
            os.link(self.path, retired)
        except OSError:
            return None
        return retired

    def abandon(self) -> None:
        """Drop the new file (the old log is whole and stays)."""
        self.thread.join()
        if self.fh is not None and not self.fh.closed:
            self.fh.close()
        if os.path.exists(self.new_path):
            os.remove(self.new_path)

    def stats(self) -> dict:
        return {"seconds": time.perf_counter() - self.started, "swap_seconds": self.swap_s,
                "swap_parts": self.swap_parts,
                "bytes_before": self.bytes_before, "bytes_copied": self.copied,
                "bytes_after": os.path.getsize(self.path), "checkpoint": self.last_checkpoint}

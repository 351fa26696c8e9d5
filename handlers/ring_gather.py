"""Design (b) of asynchronous checkpoints: the gather runs on the persistent kernel, not in the
caller's stream.

checkpoint_async's default (design (a), `device_side="stream"`) enqueues a region's page list
and its gather into host-mapped staging in the caller's stream: the next decode step waits
for the gather. With `device_side="ring"` the caller's stream keeps only the page list and a
trigger (trigger_bump raises a device counter); a gather task, published on a
PersistentRuntime's ring as the capture is enqueued, waits on the device for that counter and
copies the listed pages into the slot's staging while the next step computes. The writer
thread waits for the task's completion mark instead of an event.

The stream's later work runs beside the gather, so only a region whose listed pages the steps
after it do not write can be gathered this way: a block table's KV cache with one slot a page
(BlockTableScanner.append_only), whose later steps write later positions. A page is written
again only when its position comes round again (a new round of requests), many more steps
later than the ring's bounded lag (slots plus coalesced checkpoints). Other regions keep
design (a) in the same checkpoint.

A resident kernel never ends by itself, so nothing may wait for the whole device while it
runs: torch.cuda.synchronize() (the decode loop waits for its stream instead), and CUDA's lazy
loading of a kernel at its first launch, which waits for the device to be idle. Hence
CUDA_MODULE_LOADING=EAGER, set before CUDA starts, and every other kernel (the model's, the
library's) run once before the first ring checkpoint starts the resident kernel.
"""
from __future__ import annotations

import os
import time

import numpy as np

from concordia_ir.errors import ConcordiaError

from . import kernels as hk
from .dispatcher import HEADER_WORDS
from .persistent import TAGS, PersistentRuntime

RING_GROUPS = 16   # the persistent kernel's work-groups: the gathers' width (docs/checkpointing.md)
RING_SLOTS = 1024  # task records in the ring
WATCHDOG_S = 30.0  # a gather not done after this long is an error the writer reports
# the wire word with the ticket's low half: the handler's arguments are (at, ticket), each
# record word two wire words, its low then its high 16 bits under the lap's tag
TICKET_LOW = 2 * (HEADER_WORDS + 1)


class RingGather:
    """The persistent kernel of one CheckpointWriter: a gather handler per (ring region, ring
    slot), a trigger counter per ring region, and the tickets the host has handed out."""

    def __init__(self, rt, regions: list, slots: list, groups: int = RING_GROUPS):
        """`regions`: the ring-gathered regions' states; `slots[i][j]`: ring slot i's
        RegionSlot (staging_ring.py) for region j (its page list, count and staging)."""
        check_eager_loading()
        self.rt, self.groups = rt, groups
        self.pr = PersistentRuntime(rt, blocks=groups, block_size=hk.GROUP, ring_slots=RING_SLOTS,
                                    watchdog_s=WATCHDOG_S)
        self.trigger = rt.zeros(max(1, len(regions)), np.int32)
        self.tickets = [0] * len(regions)
        self.names, handlers = {}, []
        for i, per_region in enumerate(slots):
            for j, (st, rs) in enumerate(zip(regions, per_region)):
                r = st.region
                self.names[i, j] = name = f"gather.{j}.{i}"
                handlers.append((name, hk.ring_page_gatherer(r.words_per_page, r.n_words),
                                 [r.words(), rs.pages, rs.count, rs.staging, self.trigger]))
        self.pr.register_many(handlers)
        # each gather's records encoded once (2 tags x groups x wire words); a publish writes
        # its ticket into them: encoding anew took ~94 us of the decode thread on the CPU box
        self.records = {key: self.pr.encode_tasks(name, [(key[1], 0)], groups=groups, split=1)
                        for key, name in self.names.items()}
        self.bumps = [rt.bind(hk.trigger_bump(), 1, (self.trigger, np.int32(j)))
                      for j in range(len(regions))]

    def launch(self) -> None:
        """Start the resident kernel: after the slots' graphs are instantiated (that may wait
        for an idle device, which it is not once this runs)."""
        self.pr.start()

    def record_trigger(self, j: int, stream) -> None:
        """In a slot's graph, after region j's page list: the trigger its gather waits for."""
        self.bumps[j](1, stream)

    def publish(self, slot: int, j: int) -> tuple[int, int]:
        """Publish slot `slot`'s gather of region j, for the trigger its graph replay (just
        enqueued) will raise; returns the task range for done(). Every replay raises the
        counter once, in the order of their enqueue (one caller stream), so the k-th replay's
        ticket is k."""
        self.tickets[j] = ticket = self.tickets[j] + 1
        return self.pr.publish(with_ticket(self.records[slot, j], ticket))

    def wait(self, tasks: tuple[int, int]) -> None:
        """Until the gather's records are complete (the writer thread: it only reads the
        completion marks; the caller's thread publishes)."""
        first, end = tasks
        done, n = self.pr.done_words, self.pr.slots
        t0 = time.monotonic()
        for seq in range(first, end):
            while done[seq % n] <= seq:
                if time.monotonic() - t0 > WATCHDOG_S:
                    raise ConcordiaError(f"a ring gather (task {seq}) is not done after "
                                         f"{WATCHDOG_S:g} s: the persistent kernel is stuck or gone")
                time.sleep(20e-6)

    def close(self) -> None:
        self.pr.shutdown()


def with_ticket(records: np.ndarray, ticket: int) -> np.ndarray:
    """A gather's encoded records (encode_tasks) with `ticket` written in, in both tags."""
    records[:, :, TICKET_LOW] = (ticket & 0xFFFF) | TAGS[:, None]
    records[:, :, TICKET_LOW + 1] = (ticket >> 16) | TAGS[:, None]
    return records


def check_eager_loading() -> None:
    """The resident kernel's condition on cuda (the module docstring)."""
    if os.environ.get("CUDA_MODULE_LOADING", "").upper() != "EAGER":
        raise ConcordiaError("device_side='ring' needs CUDA_MODULE_LOADING=EAGER set before "
                             "CUDA starts: a kernel loaded lazily while the resident kernel "
                             "runs may wait for it to end, which it never does")

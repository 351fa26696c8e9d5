"""The checkpoint and recovery handlers, written in the IR so that every backend runs them.

Each factory returns kernels specialised (JIT) for one page size and region size: those are
compile-time constants in the IR, so the lowered loops have fixed trip counts. Regions are
seen as 32-bit words; one work-group handles one page.
"""
from __future__ import annotations

from functools import lru_cache

from concordia_ir import (Ptr, atomic_add, atomic_max, barrier, fence, global_id, group_id, i32,
                          i64, kernel, local_array, local_id, num_groups, u32)

GROUP = 256  # work-items per page; every handler is launched with groups of this size


@lru_cache(maxsize=None)
def page_scanner(words_per_page: int, n_words: int):
    """DirtyPageScanner, shadow form: flag pages that differ from the shadow copy and append
    their indices to a compact list (one atomic per dirty page)."""
    WPP, NW, STEP = words_per_page, n_words, GROUP
    WHOLE = n_words % words_per_page == 0   # every page full: no bounds check to compile

    @kernel
    def scan_pages(cur: Ptr[u32], shadow: Ptr[u32], dirty: Ptr[i32], count: Ptr[i32]):
        flag = local_array(i32, 1)
        lid = local_id(0)
        page = group_id(0)
        if lid == 0:
            flag[0] = 0
        barrier()
        base = i64(page) * WPP
        diff = 0
        for w in range(lid, WPP, STEP):
            at = base + i64(w)
            if WHOLE or at < NW:
                if cur[at] != shadow[at]:
                    diff = 1
        if diff != 0:
            atomic_max(flag, 0, 1)
        barrier()
        if lid == 0:
            if flag[0] != 0:
                dirty[atomic_add(count, 0, 1)] = page
    return scan_pages


@lru_cache(maxsize=None)
def page_hasher(words_per_page: int, n_words: int):
    """DirtyPageScanner, hash form: a 64-bit hash per page (two order-independent 32-bit sums of
    mixed words), compared with the stored one; changed pages are listed and re-hashed."""
    WPP, NW, STEP = words_per_page, n_words, GROUP
    WHOLE = n_words % words_per_page == 0

    @kernel
    def hash_pages(cur: Ptr[u32], hashes: Ptr[u32], dirty: Ptr[i32], count: Ptr[i32]):
        acc = local_array(u32, 2)
        lid = local_id(0)
        page = group_id(0)
        if lid == 0:
            acc[0] = u32(0)
            acc[1] = u32(0)
        barrier()
        base = i64(page) * WPP
        h1 = u32(0)
        h2 = u32(0)
        for w in range(lid, WPP, STEP):
            at = base + i64(w)
            if WHOLE or at < NW:
                x = cur[at] ^ (u32(w) * u32(0x9E3779B9))
                x = (x ^ (x >> u32(16))) * u32(0x85EBCA6B)
                x = (x ^ (x >> u32(13))) * u32(0xC2B2AE35)
                h1 += x ^ (x >> u32(16))
                y = cur[at] + u32(w) * u32(0x27D4EB2F)
                y = (y ^ (y >> u32(15))) * u32(0x2C1B3C6D)
                y = (y ^ (y >> u32(12))) * u32(0x297A2D39)
                h2 += y ^ (y >> u32(15))
        atomic_add(acc, 0, h1)
        atomic_add(acc, 1, h2)
        barrier()
        if lid == 0:
            if acc[0] != hashes[2 * page] or acc[1] != hashes[2 * page + 1]:
                hashes[2 * page] = acc[0]
                hashes[2 * page + 1] = acc[1]
                dirty[atomic_add(count, 0, 1)] = page
    return hash_pages


@lru_cache(maxsize=None)
def flag_collector():
    """Store tracking's checkpoint: list the pages whose dirty flag an instrumented store set."""
    @kernel
    def collect_flags(flags: Ptr[i32], dirty: Ptr[i32], count: Ptr[i32], n_pages: i32):
        p = global_id(0)
        if p < n_pages:
            if flags[p] != 0:
                dirty[atomic_add(count, 0, 1)] = p
    return collect_flags


@lru_cache(maxsize=None)
def flag_clearer():
    @kernel
    def clear_flags(flags: Ptr[i32], pages: Ptr[i32], n: i32):
        k = global_id(0)
        if k < n:
            flags[pages[k]] = 0
    return clear_flags


@lru_cache(maxsize=None)
def page_gatherer(words_per_page: int, n_words: int):
    """Copy listed pages into a staging buffer (slot k <- page pages[first + k]); in shadow mode
    the shadow is brought up to date in the same pass."""
    WPP, NW, STEP = words_per_page, n_words, GROUP
    WHOLE = n_words % words_per_page == 0

    @kernel
    def gather_pages(cur: Ptr[u32], shadow: Ptr[u32], pages: Ptr[i32], staging: Ptr[u32],
                     first: i32, update_shadow: i32):
        slot = group_id(0)
        base = i64(pages[first + slot]) * WPP
        out = i64(slot) * WPP
        for w in range(local_id(0), WPP, STEP):
            at = base + i64(w)
            if WHOLE or at < NW:
                v = cur[at]
                staging[out + i64(w)] = v
                if update_shadow != 0:
                    shadow[at] = v
    return gather_pages


# work-groups of a counted gather: about as many as an H100 holds at once (132 SMs x 8 groups
# of 256), so one pass takes every page; a launch over the list's capacity (8,192 groups for
# 16 MiB of 2 KiB pages) spent its time starting groups that found nothing to copy
GATHER_GROUPS = 1024


@lru_cache(maxsize=None)
def counted_page_gatherer(words_per_page: int, n_words: int, group: int = GROUP):
    """page_gatherer for a page list whose length is on the device (count[0], written by a
    scan in the same stream): a fixed grid (at most GATHER_GROUPS groups) strides over the
    list, so the host never waits to learn the count. The asynchronous checkpoint uses it.
    `group`: the work-items a group it is launched with (the dispatch benchmark's ring runs
    wider groups than the checkpoint's launches)."""
    WPP, NW, STEP = words_per_page, n_words, group
    WHOLE = n_words % words_per_page == 0

    @kernel
    def gather_counted(cur: Ptr[u32], shadow: Ptr[u32], pages: Ptr[i32], count: Ptr[i32],
                       staging: Ptr[u32], update_shadow: i32):
        for slot in range(group_id(0), count[0], num_groups(0)):
            base = i64(pages[slot]) * WPP
            out = i64(slot) * WPP
            for w in range(local_id(0), WPP, STEP):
                at = base + i64(w)
                if WHOLE or at < NW:
                    v = cur[at]
                    staging[out + i64(w)] = v
                    if update_shadow != 0:
                        shadow[at] = v
    return gather_counted


@lru_cache(maxsize=None)
def page_scatterer(words_per_page: int, n_words: int):
    """DeltaApplier: scatter staged pages back into a region (recovery, migration)."""
    WPP, NW, STEP = words_per_page, n_words, GROUP
    WHOLE = n_words % words_per_page == 0

    @kernel
    def scatter_pages(region: Ptr[u32], pages: Ptr[i32], staging: Ptr[u32], first: i32):
        slot = group_id(0)
        base = i64(pages[first + slot]) * WPP
        src = i64(slot) * WPP
        for w in range(local_id(0), WPP, STEP):
            at = base + i64(w)
            if WHOLE or at < NW:
                region[at] = staging[src + i64(w)]
    return scatter_pages


@lru_cache(maxsize=None)
def state_counter(record_words: int, slots: int):
    """How many work-items of a paused context are running / done / paused, and paused at each
    safepoint: counts[0..2] by status, counts[3 + id] by safepoint. Per-group sums in local
    memory, then one atomic per group and slot, so the host reads a few words, not every record."""
    R, K = record_words, slots

    @kernel
    def count_states(ctx: Ptr[u32], counts: Ptr[i32], n: i32):
        c = local_array(i32, 64)
        lid = local_id(0)
        if lid < K:
            c[lid] = 0
        barrier()
        i = global_id(0)
        if i < n:
            st = ctx[i64(i) * R]
            atomic_add(c, i32(st), 1)
            if st == u32(2):
                atomic_add(c, 3 + i32(ctx[i64(i) * R + 1]), 1)
        barrier()
        if lid < K:
            atomic_add(counts, lid, c[lid])
    return count_states


@lru_cache(maxsize=None)
def block_table_lister(planes: int, blocks: int, block_size: int, batch: int, max_blocks: int,
                       row_bytes: int, page_size: int, capacity: int):
    """The pages a paged KV cache's decode steps wrote, listed on the device from its block
    table: for every (plane, sequence) and every position from last[0] to pos[0] (from 0 if
    pos[0] < last[0]: positions began again, a new round of requests), the page of
    slot (plane, table[seq, position // block_size], position % block_size). Item k of
    position index j goes to pages[j * planes * batch + k]; a list longer than `capacity` is
    cut there (its count, from block_table_advance, tells the host)."""
    PB, B, MB, BS, BL = planes * batch, batch, max_blocks, block_size, blocks
    ROWB, PAGE, CAP = row_bytes, page_size, capacity

    @kernel
    def list_kv_pages(table: Ptr[i64], pos: Ptr[i64], last: Ptr[i64], pages: Ptr[i32]):
        g = global_id(0)
        if g < PB:
            plane = i64(g // B)
            seq = i64(g % B)
            j = i64(0)
            first = last[0]
            if first > pos[0]:   # positions began again (a new round of requests): from 0
                first = i64(0)
            for p in range(first, pos[0] + i64(1)):
                blk = table[seq * i64(MB) + p // i64(BS)]
                slot = (plane * i64(BL) + blk) * i64(BS) + p % i64(BS)
                at = j * i64(PB) + i64(g)
                if at < i64(CAP):
                    pages[at] = i32(slot * i64(ROWB) // i64(PAGE))
                j = j + i64(1)
    return list_kv_pages


@lru_cache(maxsize=None)
def block_table_advance(planes: int, batch: int):
    """After list_kv_pages (the next launch in the same stream): count[0] = the list's length,
    last[0] = pos[0] + 1 (the next list starts after this step)."""
    PB = planes * batch

    @kernel
    def advance_kv_pages(pos: Ptr[i64], last: Ptr[i64], count: Ptr[i32]):
        if global_id(0) == 0:
            first = last[0]
            if first > pos[0]:   # as list_kv_pages: positions began again
                first = i64(0)
            count[0] = i32((pos[0] + i64(1) - first) * i64(PB))
            last[0] = pos[0] + i64(1)
    return advance_kv_pages


@lru_cache(maxsize=None)
def ring_page_gatherer(words_per_page: int, n_words: int):
    """counted_page_gatherer as a persistent-kernel handler (design (b) of asynchronous
    checkpoints): it waits until trigger[at] reaches `ticket` (raised in the caller's stream
    by trigger_bump once the page list is made), then gathers the listed pages into host-mapped
    staging, while the caller's stream goes on. Work-item 0 waits with atomic reads (they go
    to the device-wide cache, never a stale copy); after the barrier every work-item fences
    (acquire: the list's and the pages' writes, made before the bump in stream order, are seen
    after it) and reads the count atomically. (A handler has no local arrays of its own: the
    dispatcher's op table holds the only ones.)"""
    WPP, NW, STEP = words_per_page, n_words, GROUP
    WHOLE = n_words % words_per_page == 0

    @kernel
    def gather_ring(cur: Ptr[u32], pages: Ptr[i32], count: Ptr[i32], staging: Ptr[u32],
                    trigger: Ptr[i32], at: i32, ticket: i32):
        if local_id(0) == 0:   # one poll a group: the rest wait at the barrier
            t = atomic_add(trigger, at, 0)
            while t < ticket:
                t = atomic_add(trigger, at, 0)
        barrier()
        fence()
        n = atomic_add(count, 0, 0)
        for slot in range(group_id(0), n, num_groups(0)):
            base = i64(pages[slot]) * WPP
            out = i64(slot) * WPP
            for w in range(local_id(0), WPP, STEP):
                at_w = base + i64(w)
                if WHOLE or at_w < NW:
                    staging[out + i64(w)] = cur[at_w]
    return gather_ring


@lru_cache(maxsize=None)
def trigger_bump():
    """The device-side trigger of a ring gather: enqueued in the caller's stream after the page
    list, it raises trigger[at] by one (the kernels before it in the stream are complete)."""
    @kernel
    def bump_trigger(trigger: Ptr[i32], at: i32):
        if global_id(0) == 0:
            fence()
            atomic_add(trigger, at, 1)
    return bump_trigger

"""The checkpoint handlers' tile form for Tenstorrent: one 4 KiB page = one 32x32 tile of
32-bit words. DirtyPageScanner: `reduce_max(ne(page, shadow page))` per tile, one flag per
page; page gather and scatter: tile copies of a host-chosen page list. The IR handlers
(handlers/kernels.py) remain the definition; these run instead on the tile tier, where a
page compare is one tile op instead of 1024 scalar loads over the NoC.

The programs take `ttl` (tt-lang, or its simulator) like the generated tile programs do.
"""
from __future__ import annotations

TILE_WORDS = 32 * 32


def _grid(n: int) -> tuple[int, int]:
    return (min(n, 4), min(-(-n // 4), 4))


def page_compare(ttl, npages: int):
    """flags[t] (element [0, 0] of tile t) = 1 where page t differs from its shadow."""
    @ttl.operation(grid=_grid(npages))
    def compare_pages(cur, shadow, flags):
        cols, rows = ttl.grid_size(dims=2)
        per = -(-npages // (cols * rows))
        d_cur = ttl.make_dataflow_buffer_like(cur, shape=(1, 1), block_count=2)
        d_shadow = ttl.make_dataflow_buffer_like(shadow, shape=(1, 1), block_count=2)
        d_flags = ttl.make_dataflow_buffer_like(flags, shape=(1, 1), block_count=2)

        @ttl.compute()
        def compute():
            c, r = ttl.node(dims=2)
            first = (r * cols + c) * per
            for t in range(first, min(npages, first + per)):
                with d_cur.wait() as a, d_shadow.wait() as b, d_flags.reserve() as f:
                    f.store(ttl.math.reduce_max(ttl.math.ne(a, b), dims=[0, 1], shape=(1, 1)))

        @ttl.datamovement()
        def read():
            c, r = ttl.node(dims=2)
            first = (r * cols + c) * per
            for t in range(first, min(npages, first + per)):
                with d_cur.reserve() as a, d_shadow.reserve() as b:
                    xa = ttl.copy(cur[t, 0], a)
                    xa.wait()
                    xb = ttl.copy(shadow[t, 0], b)
                    xb.wait()

        @ttl.datamovement()
        def write():
            c, r = ttl.node(dims=2)
            first = (r * cols + c) * per
            for t in range(first, min(npages, first + per)):
                with d_flags.wait() as f:
                    xf = ttl.copy(f, flags[t, 0])
                    xf.wait()
    return compare_pages


def page_copy(ttl, src_pages: list[int], dst_pages: list[int]):
    """dst[dst_pages[k]] = src[src_pages[k]] for every k: a gather into staging (dst_pages =
    0, 1, ...) or a scatter out of it (src_pages = 0, 1, ...)."""
    n = len(src_pages)

    @ttl.operation(grid=_grid(n))
    def copy_pages(src, dst):
        cols, rows = ttl.grid_size(dims=2)
        per = -(-n // (cols * rows))
        d_in = ttl.make_dataflow_buffer_like(src, shape=(1, 1), block_count=2)
        d_out = ttl.make_dataflow_buffer_like(dst, shape=(1, 1), block_count=2)

        @ttl.compute()
        def compute():
            c, r = ttl.node(dims=2)
            first = (r * cols + c) * per
            for _ in range(first, min(n, first + per)):
                with d_in.wait() as a, d_out.reserve() as o:
                    o.store(a)

        @ttl.datamovement()
        def read():
            c, r = ttl.node(dims=2)
            first = (r * cols + c) * per
            for k in range(first, min(n, first + per)):
                with d_in.reserve() as a:
                    xa = ttl.copy(src[src_pages[k], 0], a)
                    xa.wait()

        @ttl.datamovement()
        def write():
            c, r = ttl.node(dims=2)
            first = (r * cols + c) * per
            for k in range(first, min(n, first + per)):
                with d_out.wait() as o:
                    xo = ttl.copy(o, dst[dst_pages[k], 0])
                    xo.wait()
    return copy_pages

refused by the tile tier: kernel atomic_histogram: rem at line 6: tile rem of u32 needs unsigned division, which tiles lack; not expressible on tiles

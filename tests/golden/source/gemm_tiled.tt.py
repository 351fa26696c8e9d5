refused by the tile tier: kernel gemm_tiled: local_alloc at line 3: local memory has no tile form; not expressible on tiles

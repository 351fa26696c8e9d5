refused by the tile tier: kernel bit_length_hash: buffer %wide holds i64: Tensix tiles hold 32-bit types (64-bit types run on the scalar tier); not expressible on tiles

refused by the tile tier: kernel while_collatz: while at line 6: a loop whose trip count depends on data; not expressible on tiles

"""A shard: the single-threaded owner of the streams the ring assigns to it."""

"""Pieces shared by the gateway, the shards and the tools: the ring, the wire format, paths."""

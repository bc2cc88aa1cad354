"""The stateless HTTP gateway: routes /v1/stream/* to the owning shard (see gateway.app)."""

"""Unit tests of common/backoff.py (pure)."""

from __future__ import annotations

from ds_cluster.common.backoff import JITTER_LOW, jittered


def test_jittered_delays_stay_between_half_and_all_of_the_backoff_and_spread() -> None:
    delays = [jittered(2.0) for _ in range(1000)]
    assert all(2.0 * JITTER_LOW <= delay <= 2.0 for delay in delays)
    assert len(set(delays)) > 900  # callers that lost the same peer do not retry in step
    assert max(delays) - min(delays) > 0.5

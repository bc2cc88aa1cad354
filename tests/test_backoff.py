"""Unit tests of common/backoff.py."""

from __future__ import annotations

import trio

from ds_cluster.common.backoff import JITTER_LOW, RetryPacer, jittered


def test_jittered_delays_stay_between_half_and_all_of_the_backoff_and_spread() -> None:
    delays = [jittered(2.0) for _ in range(1000)]
    assert all(2.0 * JITTER_LOW <= delay <= 2.0 for delay in delays)
    assert len(set(delays)) > 900  # callers that lost the same peer do not retry in step
    assert max(delays) - min(delays) > 0.5


async def test_retry_pacer_doubles_to_its_cap_is_cut_short_by_a_wake_and_resets() -> None:
    pacer = RetryPacer(0.02, 0.08)
    delays = []
    for _ in range(4):
        delays.append(pacer.delay)
        started = trio.current_time()
        await pacer.after_failure()
        assert JITTER_LOW * delays[-1] <= trio.current_time() - started
    assert delays == [0.02, 0.04, 0.08, 0.08]

    pacer.wake()  # something new is due: the next wait ends at once
    with trio.fail_after(1):
        await pacer.after_failure()
    pacer.after_success()
    assert pacer.delay == 0.02

    async def wake_soon() -> None:
        await trio.sleep(0.01)
        pacer.wake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wake_soon)
        with trio.fail_after(5):
            await pacer.idle()

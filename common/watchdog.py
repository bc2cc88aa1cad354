"""Loop-stall watchdog: log whenever the trio event loop was blocked too long.

A process serves everything from one trio thread, so one request that computes for a
second delays every other request by a second. The watchdog is a trio instrument on the
scheduler's I/O wait hooks: the time from the end of one I/O wait to the start of the
next is one batch of task steps, during which no socket was looked at. A batch longer
than `STALL_THRESHOLD` is logged as a WARNING with its length. Only the two I/O hooks
are implemented, so it costs two calls per scheduler pass and nothing per task step.
`max_stall` keeps the longest batch seen, and `histogram` every batch of at least
`HISTOGRAM_MIN` seconds (`ds_loop_stall_seconds`), for metrics.

To say *where* the loop was stuck, a daemon thread looks every `SAMPLE_INTERVAL` and,
when the current batch has run longer than the threshold, records the loop thread's stack
(once per batch); the warning then includes it. The sample is taken when the loop thread
next lets go of the GIL, which is inside the culprit for Python code and right after it
for one long C call.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback

import trio

from ds_cluster.common.metrics import Histogram

STALL_THRESHOLD = 0.100  # seconds; a longer blocked stretch is logged
SAMPLE_INTERVAL = 0.050  # seconds between the sampler thread's looks at the loop
LOG_INTERVAL = 1.0  # seconds: at most one warning per interval (the rest are counted)
HISTOGRAM_MIN = 0.001  # seconds: shorter batches are the loop working normally
STALL_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

log = logging.getLogger("watchdog")


class LoopWatchdog(trio.abc.Instrument):
    """Measures each scheduler batch; see the module docstring."""

    def __init__(self, name: str, threshold: float = STALL_THRESHOLD) -> None:
        self.name = name
        self.threshold = threshold
        self.max_stall = 0.0  # seconds: the longest blocked stretch seen so far
        self.stalls = 0  # how many were over the threshold
        self.histogram = Histogram(STALL_BUCKETS)  # batches of HISTOGRAM_MIN or longer
        self._since: float | None = None  # when the running batch started (None: idle)
        # (batch start, the loop's stack), taken by the sampler during a long batch
        self._sample: tuple[float, str] | None = None
        self._loop_thread = threading.get_ident()
        self._logged_at = -LOG_INTERVAL  # when the last warning was written
        self._unlogged = 0  # stalls since then that were not

    def after_io_wait(self, timeout: float) -> None:
        self._since = time.perf_counter()

    def before_io_wait(self, timeout: float) -> None:
        since = self._since
        if since is None:
            return
        self._since = None
        now = time.perf_counter()
        blocked = now - since
        if blocked > self.max_stall:
            self.max_stall = blocked
        if blocked >= HISTOGRAM_MIN:
            self.histogram.observe(blocked)
        if blocked > self.threshold:
            self.stalls += 1
            self._report(since, now, blocked)

    def _report(self, since: float, now: float, blocked: float) -> None:
        sample, self._sample = self._sample, None
        if now - self._logged_at < LOG_INTERVAL:
            self._unlogged += 1  # an overloaded process: one line per interval is enough
            return
        where = f"; it was in:\n{sample[1]}" if sample and sample[0] == since else ""
        more = f", {self._unlogged} more since the last report" if self._unlogged else ""
        log.warning(
            "%s: event loop blocked for %.0f ms (longest so far %.0f ms%s)%s",
            self.name,
            blocked * 1000,
            self.max_stall * 1000,
            more,
            where,
        )
        self._logged_at = now
        self._unlogged = 0

    def sample_forever(self) -> None:
        """The sampler thread's body (a daemon: it ends with the process)."""
        while True:
            time.sleep(SAMPLE_INTERVAL)
            since = self._since
            if since is None or (self._sample is not None and self._sample[0] == since):
                continue
            if time.perf_counter() - since > self.threshold:
                frame = sys._current_frames().get(self._loop_thread)
                if frame is not None:
                    self._sample = (since, "".join(traceback.format_stack(frame)[-10:]))


_current: LoopWatchdog | None = None


def install(name: str, threshold: float = STALL_THRESHOLD) -> LoopWatchdog:
    """Start watching the running trio loop (call from inside `trio.run`)."""
    global _current
    watchdog = LoopWatchdog(name, threshold)
    trio.lowlevel.add_instrument(watchdog)
    threading.Thread(target=watchdog.sample_forever, name="loop-watchdog", daemon=True).start()
    _current = watchdog
    return watchdog


def current() -> LoopWatchdog | None:
    """The watchdog installed in this process, if any (for metrics)."""
    return _current

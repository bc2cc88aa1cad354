"""Loop-stall watchdog: log whenever the trio event loop was blocked too long.

A process serves everything from one trio thread, so one request that computes for a
second delays every other request by a second. The watchdog is a trio instrument on the
scheduler's I/O wait hooks: the time from the end of one I/O wait to the start of the
next is one batch of task steps, during which no socket was looked at. A batch longer
than `STALL_THRESHOLD` is logged as a WARNING with its length. Only the two I/O hooks
are implemented, so it costs two calls per scheduler pass and nothing per task step.
`max_stall` keeps the longest batch seen, and `histogram` every batch of at least
`HISTOGRAM_MIN` seconds (`ds_loop_stall_seconds`), for metrics.

To say *where* the loop was stuck, a one-shot SIGALRM timer is armed when a batch starts
(unless one is pending) for the threshold; its handler runs on the loop thread itself,
and records the stack of the frame it interrupted when the running batch is over the
threshold (once per batch), else re-arms the timer for the running batch, or lets it
lapse once the loop waits for I/O. The warning then includes that stack: inside the
culprit for Python code, right after it for one long C call. A busy loop takes at most
one timer signal per threshold; one that has gone idle, one more.

It used to be a sampler thread that looked every 50 ms. A thread needs the GIL to look:
when it woke while the loop ran Python, the loop handed the GIL over within the switch
interval and then waited until the thread had been scheduled and was done, 20 times a
second in every process. On the loaded 2-core machine, a Python loop busy a third of
the time beside such a thread stalled longer in all in 6 of 8 alternated 10 s runs (about
twice as long), its longest stall per run 6-60 ms (median 19) against 4-33 ms (median 7)
without the thread, and 5-8 ms with this timer (3 runs).
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import time
import traceback
from types import FrameType

import trio

from ds_cluster.common.metrics import Histogram

STALL_THRESHOLD = 0.100  # seconds; a longer blocked stretch is logged
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
        # (batch start, the loop's stack), taken by the timer's handler during a long batch
        self._sample: tuple[float, str] | None = None
        self._timed = False  # the timer's handler is installed (`install`)
        self._armed = False  # a timer signal is pending
        self._logged_at = -LOG_INTERVAL  # when the last warning was written
        self._unlogged = 0  # stalls since then that were not

    def after_io_wait(self, timeout: float) -> None:
        self._since = time.perf_counter()
        if self._timed and not self._armed:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.threshold)

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

    def on_timer(self, frame: FrameType | None) -> None:
        """The timer went off (on the loop thread, between two bytecodes of what it
        runs): take the stack of a batch over the threshold, or time the running batch
        again; nothing when the loop waits for I/O (the next batch arms it anew)."""
        self._armed = False
        since = self._since
        if since is None:
            return
        if self._sample is not None and self._sample[0] == since:
            return  # this batch's stack is taken
        left = since + self.threshold - time.perf_counter()
        if left > 0:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, left)
        elif frame is not None:
            self._sample = (since, "".join(traceback.format_stack(frame)[-10:]))

    def after_run(self) -> None:
        self.stop()

    def stop(self) -> None:
        """No more timer signals (the loop is over, or another watchdog replaces this
        one)."""
        self._timed = False
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


_current: LoopWatchdog | None = None


def install(name: str, threshold: float = STALL_THRESHOLD) -> LoopWatchdog:
    """Start watching the running trio loop (call from inside `trio.run`). Off the main
    thread (no signal handler can be set there), stalls are measured without a stack."""
    global _current
    if _current is not None:
        _current.stop()
    watchdog = LoopWatchdog(name, threshold)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, _on_alarm)
        atexit.register(watchdog.stop)  # the interpreter's exit resets SIGALRM to its default
        watchdog._timed = True
    trio.lowlevel.add_instrument(watchdog)
    _current = watchdog
    return watchdog


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    """SIGALRM: the installed watchdog's timer (the handler stays once set: a signal
    still pending at `stop` must not end the process, as SIGALRM's default would)."""
    watchdog = _current
    if watchdog is not None and watchdog._timed:
        watchdog.on_timer(frame)


def current() -> LoopWatchdog | None:
    """The watchdog installed in this process, if any (for metrics)."""
    return _current

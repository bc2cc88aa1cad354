"""Collapsing identical live reads: clients waiting for the same answer share one upstream call.

A thousand long-poll readers parked at the same stream and offset would otherwise cost a
thousand shard calls, a thousand wake-ups on the shard and a thousand renders of the same
bytes. Requests with the same key (the route's share key: stream path, raw query string,
forwarded headers) that are in flight at the same time join one `_Group`; its upstream
fetch runs in a task of the gateway-level nursery, not in any client's request, so the
first client leaving does not end it for the others. Every waiter gets the same answer,
rendered once.

Waiting is cheap, because under load most long-polls are answered within moments of
asking (the next append comes soon). A waiter first parks its request's task with no
cancel scope, event or socket watch of its own, and the fetch reschedules it directly with
the answer. Only a group still unanswered WATCH_AFTER seconds after it began turns its
waiters into watchers of their clients (each awaits its `until_gone` in a cancel scope,
which the fetch cancels when the answer is ready), so a client that leaves a long wait
is noticed. The last waiter to leave cancels the fetch (so the shard is told `cancel`)
and drops the group; a later identical request starts a new one.

A parked waiter may also give a `write_at_once`: the fetch then hands it the answer
before rescheduling the waiter, so that every waiting client's response goes to its socket
from the fetch's task, one after another, as the answer arrives (the SSE fan-out's way),
rather than a scheduler pass later from each waiter's own task, whose turns interleave
with everything else the gateway runs.

The fetch may hand its answer over early (`fetch(request, early)`): the long-poll's
fetch has the shard connection's reader call `early` as the shard's answer arrives, so the
parked clients' responses are written from that task, with no scheduler pass between the
frame's arrival and the sockets (as the SSE fan-out relays its chunks); the fetch task
then finds its group answered.

Once those responses are written, the gateway gives its CPU up (`os.sched_yield`) before
it goes on. Each write wakes a reader, and Linux tends to queue a woken process on the
CPU of the process that woke it: a reader on this host then waited for all the work the
fan-out leaves behind (every waiter's task finishing its request, about 30 us each) while
the other core idled. Measured on the 2-core test machine with 500 long-poll readers of
50 streams (10 readers per message, `ds-cluster bench --scenario longpoll-500`): the time
between a message's first and last reader, p90, went from 1.1-1.5 ms to 0.4-0.6 ms. The
yield costs one system call per answered group, and nothing when no other process waits.

Only the sharing lives here; what the answer is (status, headers, body) is the caller's
`fetch`, run once per group.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any

import trio
from outcome import Value
from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

from ds_cluster.gateway.answers import Answer

log = logging.getLogger(__name__)

# Seconds a group waits for its answer before its waiters watch their clients.
WATCH_AFTER = 1.0

# fetch(request, early): the answer; `early` may be given it before (from any task, once)
Fetch = Callable[[Any, Callable[[Answer], None]], Awaitable[Answer]]
# Writes a group's answer to a waiter's client at once, from the fetch's task; must not
# block or raise. Its result is not looked at: the waiter's own task learns what happened
# through its own state.
WriteAtOnce = Callable[[Answer], object]

# A parked waiter is woken with None when the answer is ready, with _WATCH when it is to
# watch its client from now on.
_WATCH = True


class _Group:
    """One upstream call and the clients waiting for its answer."""

    __slots__ = ("answer", "parked", "scope", "turning", "watched", "watchers")

    def __init__(self) -> None:
        self.answer: Answer | None = None
        self.scope = trio.CancelScope()  # the fetch's; cancelled when the last waiter leaves
        # Waiters not watching their clients (yet), each with its `write_at_once`.
        self.parked: dict[Task, WriteAtOnce | None] = {}
        self.watched = False  # the group is past WATCH_AFTER: newcomers watch at once
        self.watchers: set[trio.CancelScope] = set()  # waiters watching their clients
        self.turning = 0  # waiters told to watch that have not started yet

    def waiting(self) -> int:
        return len(self.parked) + self.turning + len(self.watchers)


class Collapser:
    """Shares one in-flight fetch between requests with the same key."""

    def __init__(
        self,
        nursery: trio.Nursery,
        fetch: Fetch,
        failed: Answer,
        watch_after: float = WATCH_AFTER,
    ) -> None:
        """`fetch(request)` must turn every upstream failure into an Answer; should it
        raise anyway, or be cancelled with clients still waiting (shutdown), they get
        `failed`."""
        self._nursery = nursery
        self._fetch = fetch
        self._failed = failed
        self._watch_after = watch_after
        self._groups: dict[Hashable, _Group] = {}
        # Groups in the order they began, each with when its waiters are to watch.
        self._young: deque[tuple[float, _Group]] = deque()
        self._timer: Task | None = None  # the task that turns late groups, when parked
        nursery.start_soon(self._turn_late_groups)

    def waiting(self) -> int:
        """Requests waiting for a shared answer now (for metrics)."""
        return sum(group.waiting() for group in self._groups.values())

    async def wait(
        self,
        key: Hashable,
        request: Any,
        until_gone: Callable[[], Awaitable[None]],
        write_at_once: WriteAtOnce | None = None,
    ) -> Answer | None:
        """The answer of the group for `key` (started with `fetch(request)` when there is
        none), or None once this request's client has disconnected (`until_gone` returns
        when it has). While this request is parked, the answer is first given to
        `write_at_once` (when there is one) from the fetch's task."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
            self._nursery.start_soon(self._lead, key, group, request)
            self._young.append((trio.current_time() + self._watch_after, group))
            timer = self._timer
            if timer is not None:
                self._timer = None
                reschedule(timer)
        if not group.watched:
            task = current_task()
            group.parked[task] = write_at_once
            if await wait_task_rescheduled(partial(self._abort_parked, key, group, task)) is None:
                return group.answer  # answered
            group.turning -= 1  # _WATCH
            if group.answer is not None:  # answered right after the turn
                return group.answer
        scope = trio.CancelScope()
        group.watchers.add(scope)
        try:
            with scope:
                await until_gone()
        finally:
            if group.answer is None:
                group.watchers.discard(scope)
                self._leave(key, group)
        return group.answer

    def _abort_parked(self, key: Hashable, group: _Group, task: Task, _: object) -> Abort:
        """A parked waiter's request is cancelled (its connection closes, the gateway
        stops)."""
        del group.parked[task]
        self._leave(key, group)
        return Abort.SUCCEEDED

    def _leave(self, key: Hashable, group: _Group) -> None:
        if not group.waiting():
            if self._groups.get(key) is group:
                del self._groups[key]
            group.scope.cancel()

    async def _lead(self, key: Hashable, group: _Group, request: Any) -> None:
        answer: Answer | None = None
        try:
            with group.scope:
                answer = await self._fetch(request, partial(self._answered, key, group))
        except Exception:  # a bug in fetch must not take the gateway's nursery down
            log.exception("collapsed fetch failed")
        finally:
            self._answered(key, group, self._failed if answer is None else answer)

    def _answered(self, key: Hashable, group: _Group, answer: Answer) -> None:
        """Give the group its answer: written to every parked waiter that has a
        `write_at_once`, each rescheduled; watchers stop watching. Once per group (the
        fetch's `early`, then its return, which then does nothing)."""
        if group.answer is not None:
            return
        group.answer = answer
        if self._groups.get(key) is group:
            del self._groups[key]  # later requests start afresh: they may see newer data
        parked, group.parked = group.parked, {}
        written = False
        for task, write_at_once in parked.items():
            if write_at_once is not None:
                written = True
                try:
                    write_at_once(answer)
                except Exception:  # a bug to log; the waiter still gets the answer
                    log.exception("writing a collapsed answer failed")
            reschedule(task)
        for scope in group.watchers:
            scope.cancel()
        if written:
            os.sched_yield()  # the readers just woken first (see the module docstring)

    async def _turn_late_groups(self) -> None:
        """Turn the waiters of each group unanswered WATCH_AFTER seconds after it began
        into watchers of their clients (one task for all groups, parked when there are
        none)."""
        young = self._young
        while True:
            if not young:
                self._timer = current_task()
                await wait_task_rescheduled(self._abort_timer)
                continue
            when, group = young[0]
            if group.answer is None and group.waiting():
                if trio.current_time() < when:
                    await trio.sleep_until(when)
                    continue
                group.watched = True
                parked, group.parked = group.parked, {}
                group.turning += len(parked)
                for task in parked:
                    reschedule(task, Value(_WATCH))
            young.popleft()

    def _abort_timer(self, _: object) -> Abort:
        self._timer = None
        return Abort.SUCCEEDED

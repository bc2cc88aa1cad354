"""Collapsing identical live reads: clients waiting for the same answer share one upstream call.

A thousand long-poll readers parked at the same stream and offset would otherwise cost a
thousand shard calls, a thousand wake-ups on the shard and a thousand renders of the same
bytes. Requests with the same key (the handler chooses it: stream path, raw query string,
forwarded headers) that are in flight at the same time join one `_Group`; its upstream
fetch runs in a task of the gateway-level nursery, not in any client's request, so the
first client leaving does not end it for the others. Every waiter gets the same answer.

Waiters cost no task of their own: each client's request task parks inside a cancel
scope, in a call that returns only if its client disconnects, and the fetch task cancels
those scopes when the answer is ready. The last waiter to leave cancels the fetch (so the
shard is told `cancel`) and drops the group; a later identical request starts a new one.

Only the sharing lives here; what the answer is (status, headers, body) is the caller's
`fetch`, run once per group.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import trio

from ds_cluster.gateway.answers import Answer

log = logging.getLogger(__name__)

Fetch = Callable[[str, dict[str, Any]], Awaitable[Answer]]


class _Group:
    """One upstream call and the clients waiting for its answer."""

    __slots__ = ("answer", "scope", "waiters")

    def __init__(self) -> None:
        self.answer: Answer | None = None
        self.scope = trio.CancelScope()  # the fetch's; cancelled when the last waiter leaves
        self.waiters: set[trio.CancelScope] = set()


class Collapser:
    """Shares one in-flight fetch between requests with the same key."""

    def __init__(self, nursery: trio.Nursery, fetch: Fetch, failed: Answer) -> None:
        """`fetch` must turn every upstream failure into an Answer; should it raise anyway,
        or be cancelled with clients still waiting (shutdown), they get `failed`."""
        self._nursery = nursery
        self._fetch = fetch
        self._failed = failed
        self._groups: dict[Hashable, _Group] = {}

    async def wait(
        self,
        key: Hashable,
        shard_id: str,
        fields: dict[str, Any],
        until_gone: Callable[[], Awaitable[None]],
    ) -> Answer | None:
        """The group's answer, or None once this request's client has disconnected
        (`until_gone` returns when it has)."""
        group = self._groups.get(key)
        if group is None:
            group = _Group()
            self._groups[key] = group
            self._nursery.start_soon(self._lead, key, group, shard_id, fields)
        scope = trio.CancelScope()
        group.waiters.add(scope)
        try:
            with scope:
                await until_gone()
        finally:
            if group.answer is None:
                self._leave(key, group, scope)
        return group.answer

    def _leave(self, key: Hashable, group: _Group, scope: trio.CancelScope) -> None:
        group.waiters.discard(scope)
        if not group.waiters:
            if self._groups.get(key) is group:
                del self._groups[key]
            group.scope.cancel()

    async def _lead(
        self, key: Hashable, group: _Group, shard_id: str, fields: dict[str, Any]
    ) -> None:
        try:
            with group.scope:
                group.answer = await self._fetch(shard_id, fields)
        except Exception:  # a bug in fetch must not take the gateway's nursery down
            log.exception("collapsed fetch failed")
        finally:
            if group.answer is None and group.waiters:
                group.answer = self._failed
            if self._groups.get(key) is group:
                del self._groups[key]  # later requests start afresh: they may see newer data
            for scope in group.waiters:
                scope.cancel()

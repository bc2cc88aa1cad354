"""A tiny in-memory runtime for driving the sans-IO core in unit tests.

It does what the shard runtime does, minus SQLite and sockets: applies Replies to a dict
of states and record lists, answers NeedRecords, simulates Wait (optionally running a
callback "during" the wait), runs fork exports against the source, and the expiry alarm.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ds_cluster.shard import core
from ds_cluster.shard.core import (
    CoreConfig,
    NeedRecords,
    NeedSource,
    Record,
    Reply,
    Request,
    Response,
    StartSse,
    StreamState,
    Wait,
)

T0 = 1_800_000_000.0


@dataclass
class Sim:
    config: CoreConfig = field(default_factory=CoreConfig)
    now: float = T0
    states: dict[str, StreamState] = field(default_factory=dict)
    records: dict[str, list[Record]] = field(default_factory=dict)
    refs: int = 0
    waits: list[Wait] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    # -- requests ---------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: dict[str, str] | None = None,
        body: bytes | str = b"",
        during_wait: Callable[[], None] | None = None,
    ) -> Response:
        if isinstance(body, str):
            body = body.encode()
        req = Request(method, path, query, {k.lower(): v for k, v in (headers or {}).items()}, body)
        decision = core.handle(req, self.states.get(path), self.now, self.config)
        return self._drive(req, path, decision, during_wait)

    def _drive(self, req, path, decision, during_wait) -> Response:
        resume: Wait | None = None
        while True:
            if isinstance(decision, Reply):
                self.apply(path, decision)
                return decision.response
            if isinstance(decision, NeedRecords):
                self._touch(path)
                recs = self.fetch(path, decision.position, decision.max_bytes)
                decision = core.finish_read(
                    req, self.states.get(path), recs, self.now, self.config, resume=resume
                )
                continue
            if isinstance(decision, Wait):
                self._touch(path)
                self.waits.append(decision)
                if during_wait is not None:
                    during_wait()
                    during_wait = None
                st = self.states.get(path)
                woken = st is None or st.tail > decision.position or st.closed
                if not woken:
                    self.now += decision.timeout
                resume = decision
                decision = core.handle(
                    req,
                    self.states.get(path),
                    self.now,
                    self.config,
                    resume=resume,
                )
                continue
            if isinstance(decision, NeedSource):
                return self._fork(req, path, decision)
            if isinstance(decision, StartSse):
                self._touch(path)
                self.last_sse = decision.session
                return decision.session.head
            raise AssertionError(decision)

    def _fork(self, req: Request, path: str, need: NeedSource) -> Response:
        src = self.states.get(need.source)
        plan = core.plan_export(
            src,
            need.offset,
            need.sub_offset,
            self.now,
            self.config,
            content_type=need.content_type,
        )
        if isinstance(plan, Response):
            reply = core.create_fork(req, plan, self.now, self.config)
            self.apply(path, reply)
            return reply.response
        recs = self.fetch(need.source, plan, 1) if need.sub_offset > 0 else []
        out = core.export_fork(
            src,
            need.offset,
            need.sub_offset,
            recs,
            self.now,
            self.config,
            content_type=need.content_type,
        )
        if isinstance(out, Response):
            reply = core.create_fork(req, out, self.now, self.config)
            self.apply(path, reply)
            return reply.response
        export, new_src = out
        self.states[need.source] = new_src
        self.refs += 1
        reply = core.create_fork(req, export, self.now, self.config, ref=f"ref{self.refs}")
        if not reply.changed:
            self.release(need.source)
        self.apply(path, reply)
        return reply.response

    # -- storage ----------------------------------------------------------------------

    def fetch(self, path: str, position: int, max_bytes: int) -> list[Record]:
        """Records with end > position; a linked fork's inherited ones from its source."""
        out, size = [], 0
        st = self.states.get(path)
        fork = st.fork if st is not None else None
        if fork is not None and fork.linked and position < fork.position:
            json_mode = "json" in st.content_type
            out = core.clip_below(
                self.fetch(fork.source, position, max_bytes), fork.position, json_mode
            )
            size = sum(len(r.data) for r in out)
            if size >= max_bytes or not out or out[-1].end < fork.position:
                return out
        for r in self.records.get(path, []):
            if r.end <= position:
                continue
            out.append(r)
            size += len(r.data)
            if size >= max_bytes:
                break
        return out

    def apply(self, path: str, reply: Reply) -> None:
        if reply.changed:
            old = self.states.get(path)
            if reply.state is None:
                self.purge(path)
                return
            if reply.fresh:
                if old is not None:
                    self.purge(path)
                self.records[path] = []
            self.records.setdefault(path, []).extend(reply.records)
            self.states[path] = reply.state
        elif reply.touch:
            self._touch(path)

    def _touch(self, path: str) -> None:
        st = self.states.get(path)
        if st is not None:
            self.states[path] = replace(st, last_access=self.now)

    def purge(self, path: str) -> None:
        st = self.states.pop(path, None)
        self.records.pop(path, None)
        if st is not None and st.fork is not None:
            self.release(st.fork.source)

    def release(self, source: str) -> None:
        self.released.append(source)
        new = core.release_fork(self.states.get(source), self.now)
        if new is None:
            self.purge(source)
        else:
            self.states[source] = new

    def alarm(self) -> None:
        for path in list(self.states):
            reply = core.expire(self.states.get(path), self.now)
            if reply is not None:
                self.apply(path, reply)

    # -- conveniences -----------------------------------------------------------------

    def put(self, path: str, body: bytes | str = b"", ct: str | None = "text/plain", **hdrs):
        headers = {k.replace("_", "-"): v for k, v in hdrs.items()}
        if ct is not None:
            headers["content-type"] = ct
        return self.request("PUT", path, headers=headers, body=body)

    def post(self, path: str, body: bytes | str = b"", ct: str | None = "text/plain", **hdrs):
        headers = {k.replace("_", "-"): v for k, v in hdrs.items()}
        if ct is not None:
            headers["content-type"] = ct
        return self.request("POST", path, headers=headers, body=body)

    def get(self, path: str, query: str = "", **kw) -> Response:
        return self.request("GET", path, query=query, **kw)

    def read_all(self, path: str) -> bytes:
        """Catch-up read following Stream-Next-Offset until up to date."""
        out, offset = b"", "-1"
        for _ in range(10_000):
            r = self.get(path, f"offset={offset}")
            assert r.status == 200, r
            out += r.body
            if hdr(r, "stream-up-to-date") == "true":
                return out
            offset = hdr(r, "stream-next-offset")
        raise AssertionError("never up to date")


def hdr(response: Response, name: str) -> str | None:
    for k, v in response.headers:
        if k == name:
            return v
    return None


def jbody(response: Response):
    return json.loads(response.body)

"""The chaos workload: idempotent writers, live readers and cross-shard forks.

Writers are Kafka-style idempotent producers (PROTOCOL.md 5.2.1): each batch gets the next
(epoch, seq) and, on a 5xx, a connection error or a timeout, the SAME (epoch, seq) is sent
again until the server answers 200 (stored) or 204 (already stored). A batch is
acknowledged only then, so "acknowledged" here means exactly what the server promised.

Readers tail a stream from offset -1 by long-poll or SSE and resume from the last offset
the server confirmed (Stream-Next-Offset, or the SSE control event's streamNextOffset)
after any error or server-closed connection, as a well-behaved client does.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from urllib.parse import quote

import httpx
import trio

from .model import ReaderLog, Stats, StreamPlan, Violation, WriterLedger
from .payload import Decoder, PayloadError, encode_batch, message_id
from .sse import SseParser

STREAM_PREFIX = "/v1/stream/"
TRANSIENT = (httpx.TransportError, trio.TooSlowError)  # outcome unknown: retry


def stream_url(base: str, path: str) -> str:
    return base.rstrip("/") + STREAM_PREFIX + quote(path, safe="/")


RETRY_CAP = 0.25  # seconds


def retry_delay(attempt: int, rng: random.Random) -> float:
    """Jittered exponential backoff from 50 ms, capped at RETRY_CAP.

    Deliberately shorter than the gateway's `Retry-After: 1`: the chaos tool times how
    long a shard stays unavailable, and a second-long sleep would blur that by a second.
    """
    return min(0.05 * (2 ** min(attempt, 5)), RETRY_CAP) * (0.5 + rng.random())


class Run:
    """What every workload task shares: the HTTP client, the clock, the records."""

    def __init__(
        self,
        base_url: str,
        client: httpx.AsyncClient,
        rng: random.Random,
        *,
        request_timeout: float,
        on_write_ok: Callable[[str, float], None],
    ) -> None:
        self.base_url = base_url
        self.client = client
        self.rng = rng
        self.request_timeout = request_timeout
        self.on_write_ok = on_write_ok  # (shard, request start time) after a 200/204
        self.start = trio.current_time()
        self.stats = Stats()
        self.violations: list[Violation] = []

    def now(self) -> float:
        return trio.current_time() - self.start

    def url(self, path: str) -> str:
        return stream_url(self.base_url, path)

    def violation(self, kind: str, stream: str, detail: str) -> None:
        self.violations.append(Violation(kind, stream, detail))

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One attempt, bounded by the run's request timeout (raises TRANSIENT on failure)."""
        with trio.fail_after(self.request_timeout):
            return await self.client.request(method, self.url(path), **kwargs)

    async def ensure(self, method: str, path: str, ok: tuple[int, ...], **kwargs) -> httpx.Response:
        """Repeat an idempotent request until it gets an answer in `ok` or a definitive
        4xx (anything but 429); 5xx, 429 and connection errors are retried."""
        attempt = 0
        while True:
            try:
                response = await self.request(method, path, **kwargs)
                status = response.status_code
                self.stats.count_status(str(status))
                if status in ok or (status < 500 and status != 429):
                    return response
            except TRANSIENT as exc:
                self.stats.count_status(type(exc).__name__)
            attempt += 1
            self.stats.retries += 1
            await trio.sleep(retry_delay(attempt, self.rng))


async def create_stream(run: Run, plan: StreamPlan) -> None:
    """PUT the stream (or fork), retrying: creation with the same config is idempotent."""
    headers = {"content-type": plan.content_type}
    if plan.fork_of is not None:
        headers["stream-forked-from"] = STREAM_PREFIX + plan.fork_of
        if plan.fork_offset is not None:
            headers["stream-fork-offset"] = plan.fork_offset
    response = await run.ensure("PUT", plan.path, (200, 201), headers=headers)
    if response.status_code not in (200, 201):
        run.violation(
            "create-failed", plan.path, f"PUT answered {response.status_code}: {response.text:.200}"
        )
        return
    plan.created = True


class Writer:
    """One idempotent producer appending batches of 1-3 messages to one stream."""

    def __init__(self, run: Run, plan: StreamPlan, name: str, pause: float) -> None:
        self.run = run
        self.plan = plan
        self.name = name
        self.pause = pause
        self.ledger = WriterLedger(name=name, stream=plan.path)
        self.producer_id = name
        self.epoch = 0
        self.seq = 0
        self.batch_no = 0
        self.progress = trio.Event()  # set (and replaced) after every acknowledged batch

    async def write_until(self, stop: trio.Event) -> None:
        """Write until `stop` is set; the batch in flight then is still seen through."""
        rng = self.run.rng
        while not stop.is_set():
            ids = [message_id(self.name, self.batch_no, i) for i in range(rng.randint(1, 3))]
            self.batch_no += 1
            await self._send(ids)
            if self.pause:
                await trio.sleep(self.pause * (0.5 + rng.random()))

    async def _send(self, ids: list[str]) -> None:
        run, plan, ledger = self.run, self.plan, self.ledger
        body = encode_batch(plan.content_type, ids)
        ledger.pending = ids
        attempt = 0
        first_try = trio.current_time()
        while True:
            started = trio.current_time()
            response: httpx.Response | None = None
            headers = {
                "content-type": plan.content_type,
                "producer-id": self.producer_id,
                "producer-epoch": str(self.epoch),
                "producer-seq": str(self.seq),
            }
            try:
                response = await run.request("POST", plan.path, headers=headers, content=body)
                status = response.status_code
                run.stats.count_status(str(status))
            except TRANSIENT as exc:
                run.stats.count_status(type(exc).__name__)
                status = None
            if response is not None and status in (200, 204):
                ledger.acked.append(ids)
                ledger.pending = None
                run.stats.acked_batches += 1
                run.stats.acked_messages += len(ids)
                if status == 204:
                    run.stats.duplicates_acked += 1
                else:
                    offset = response.headers.get("stream-next-offset")
                    if offset:
                        ledger.fork_points.append((offset, len(ledger.acked) - 1))
                self.seq += 1
                took = trio.current_time() - first_try
                run.stats.write_latencies.append(took)
                longest = run.stats.longest_write_by_stream
                longest[plan.path] = max(took, longest.get(plan.path, 0.0))
                run.on_write_ok(plan.shard, started)
                self.progress.set()
                self.progress = trio.Event()
                return
            if response is not None and status is not None and status < 500 and status != 429:
                self._rejected(ids, response)
                if not self._recover(response):
                    return
                continue  # resend the same ids under the new epoch
            attempt += 1
            run.stats.retries += 1
            await trio.sleep(retry_delay(attempt, run.rng))

    def _rejected(self, ids: list[str], response: httpx.Response) -> None:
        detail = (
            f"{self.name} epoch={self.epoch} seq={self.seq} got {response.status_code} "
            f"(expected-seq={response.headers.get('producer-expected-seq')}, "
            f"server-epoch={response.headers.get('producer-epoch')}): {response.text:.160}"
        )
        kind = {409: "producer-conflict", 403: "producer-fenced"}.get(
            response.status_code, "write-rejected"
        )
        self.run.violation(kind, self.plan.path, detail)
        self.run.stats.rejected += 1

    def _recover(self, response: httpx.Response) -> bool:
        """After a producer-state conflict (the server forgot acknowledged writes, or fenced
        us), start a new epoch and resend the batch so the run can go on. Any other 4xx
        gives the batch up (it must then never appear in the stream); False in that case."""
        if response.status_code not in (403, 409):
            self.ledger.rejected.append(self.ledger.pending or [])
            self.ledger.pending = None
            return False
        try:
            server_epoch = int(response.headers.get("producer-epoch", self.epoch))
        except ValueError:
            server_epoch = self.epoch
        self.epoch = max(self.epoch, server_epoch) + 1
        self.seq = 0
        return True


class Reader:
    """A live reader tailing one stream from -1 by long-poll or SSE."""

    def __init__(self, run: Run, plan: StreamPlan, name: str, mode: str, idle: float) -> None:
        self.run = run
        self.plan = plan
        self.log = ReaderLog(name=name, stream=plan.path, mode=mode)
        self.idle = idle  # an SSE connection silent this long while writers write is stuck
        self.offset = "-1"
        self.decoder = Decoder(plan.content_type)
        self.closed = False
        self.failed = False
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        """Return once at least `count` ids were received (or the reader gave up)."""
        while len(self.log.received) < count and not self.failed:
            await self._changed.wait()

    def _commit(self, ids: list[str], offset: str) -> None:
        self.log.received.extend(ids)
        self.offset = offset
        self._changed.set()
        self._changed = trio.Event()

    def _fail(self, detail: str) -> None:
        self.failed = True
        self.run.violation(f"reader-{self.log.mode}", self.plan.path, f"{self.log.name}: {detail}")
        self._changed.set()

    async def tail(self) -> None:
        attempt = 0
        while not self.closed and not self.failed:
            try:
                if self.log.mode == "sse":
                    progressed = await self._sse_once()
                else:
                    progressed = await self._long_poll_once()
            except TRANSIENT:
                progressed = False
                self.log.errors += 1
            except (PayloadError, ValueError, KeyError) as exc:  # torn/corrupt data or control
                self._fail(f"bad data after offset {self.offset}: {exc!r:.200}")
                return
            if progressed:
                attempt = 0
                continue
            attempt += 1
            self.log.reconnects += 1
            await trio.sleep(retry_delay(attempt, self.run.rng))

    async def _long_poll_once(self) -> bool:
        response = await self.run.client.get(
            self.run.url(self.plan.path),
            params={"offset": self.offset, "live": "long-poll"},
            timeout=httpx.Timeout(self.run.request_timeout + self.idle),
        )
        status = response.status_code
        if status not in (200, 204):
            self.run.stats.count_status(f"reader {status}")
        next_offset = response.headers.get("stream-next-offset")
        if status in (200, 204) and next_offset:
            ids = self.decoder.feed(response.content) if status == 200 else []
            self._commit(ids, next_offset)
            self.closed = response.headers.get("stream-closed", "").lower() == "true"
            return True
        if status < 500 and status not in (404, 429):
            self._fail(f"long-poll at {self.offset} answered {status}: {response.text:.160}")
        self.log.errors += 1
        return False

    async def _sse_once(self) -> bool:
        """One SSE connection; True if it delivered anything (so reconnect at once)."""
        url = self.run.url(self.plan.path)
        params = {"offset": self.offset, "live": "sse"}
        timeout = httpx.Timeout(self.run.request_timeout, read=None)
        progressed = False
        async with self.run.client.stream("GET", url, params=params, timeout=timeout) as response:
            if response.status_code != 200:
                self.run.stats.count_status(f"reader {response.status_code}")
                await response.aread()
                if response.status_code < 500 and response.status_code not in (404, 429):
                    self._fail(f"SSE at {self.offset} answered {response.status_code}")
                self.log.errors += 1
                return False
            base64_data = response.headers.get("stream-sse-data-encoding", "").lower() == "base64"
            parser = SseParser()
            pending: list[bytes] = []  # data events not yet confirmed by a control event
            chunks = response.aiter_text()
            while True:
                with trio.move_on_after(self.idle) as idle_scope:
                    try:
                        text = await chunks.__anext__()
                    except StopAsyncIteration:
                        return progressed  # the server ended the response: resume
                if idle_scope.cancelled_caught:
                    self.log.stalls += 1
                    return progressed
                for event, data in parser.feed(text):
                    if event == "data":
                        if base64_data:
                            pending.append(base64.b64decode("".join(data.split()), validate=True))
                        else:
                            pending.append(data.encode())
                    elif event == "control":
                        control = json.loads(data)
                        ids: list[str] = []
                        for body in pending:
                            ids.extend(self.decoder.feed(body))
                        pending.clear()
                        self._commit(ids, control["streamNextOffset"])
                        progressed = True
                        if control.get("streamClosed"):
                            self.closed = True
                            return True

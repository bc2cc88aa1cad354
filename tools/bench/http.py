"""Lean HTTP/1.1 client pieces for the load generators.

httpx costs tens of microseconds per request, which would make the client the bottleneck on
a 2-core machine, so the generators speak HTTP/1.1 themselves over keep-alive sockets:
`ResponseParser` is an incremental response parser (Content-Length, chunked, bodiless
statuses, streamed bodies for SSE), `SyncClient` a blocking keep-alive client for setup and
read-back verification.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_header(text: str) -> tuple[str, str]:
    """A `--header 'Name: value'` argument as a (lower-case name, value) pair."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    bad = not sep or not name or any(c in name for c in " \t\r\n") or "\r" in value
    if bad or "\n" in value:
        raise ValueError(f"need a header as 'Name: value', got {text!r}")
    return name.lower(), value


_CONTEXTS: dict[str | None, ssl.SSLContext] = {}


def client_context(cacert: str | None) -> ssl.SSLContext:
    """A verifying TLS client context trusting `cacert` (else the system's CAs); one per
    process and file, so thousands of connections share it."""
    ctx = _CONTEXTS.get(cacert)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=cacert)
        ctx.set_alpn_protocols(["http/1.1"])
        _CONTEXTS[cacert] = ctx
    return ctx


@dataclass(frozen=True)
class Target:
    """Where the streams live: scheme, host, port and the path prefix streams are named
    under, plus what every request carries (extra headers) and how https is verified.
    Plain data, so it travels to the spawned load generators."""

    host: str
    port: int
    prefix: str  # e.g. "/v1/stream" (no trailing slash)
    scheme: str = "http"
    headers: tuple[tuple[str, str], ...] = ()
    cacert: str | None = None

    @classmethod
    def parse(
        cls, url: str, headers: tuple[tuple[str, str], ...] = (), cacert: str | None = None
    ) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"need an http(s)://HOST:PORT[/prefix] URL, got {url!r}")
        prefix = parts.path.rstrip("/") or "/v1/stream"
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
        return cls(parts.hostname, port, prefix, parts.scheme, headers, cacert)

    def path(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"

    @property
    def head_lines(self) -> str:
        """The host line and the extra headers, each ending in CRLF, for prebuilt heads."""
        return f"host: {self.host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in self.headers)

    def tls(self) -> ssl.SSLContext | None:
        return client_context(self.cacert) if self.scheme == "https" else None

    async def connect(
        self, factory: Callable[[], asyncio.BaseProtocol]
    ) -> tuple[asyncio.BaseTransport, Any]:
        """`loop.create_connection` to this target, over TLS for https."""
        loop = asyncio.get_running_loop()
        ctx = self.tls()
        if ctx is None:
            return await loop.create_connection(factory, self.host, self.port)
        return await loop.create_connection(
            factory, self.host, self.port, ssl=ctx, server_hostname=self.host
        )


def build_request(
    method: str,
    path: str,
    target: Target,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    """Serialize one keep-alive request (callers prebuild these outside the hot loop)."""
    lines = [f"{method} {path} HTTP/1.1", target.head_lines.removesuffix("\r\n")]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list, repr=False)


_NO_BODY = {204, 304}


class ResponseParser:
    """Incremental HTTP/1.1 response parser.

    `feed(data)` returns the responses completed by `data`. With `on_body` set, body bytes are
    handed over as they arrive (for SSE) instead of being collected; `on_head` fires when a
    response's headers are complete. `head_request` marks responses to HEAD (no body).
    """

    __slots__ = ("buf", "resp", "remaining", "chunked", "on_body", "on_head", "head_request")

    def __init__(
        self,
        on_body: Callable[[bytes], None] | None = None,
        on_head: Callable[[Response], None] | None = None,
    ) -> None:
        self.buf = b""
        self.resp: Response | None = None
        self.remaining = -1  # bytes left in body (or current chunk); -1: until close
        self.chunked = False
        self.on_body = on_body
        self.on_head = on_head
        self.head_request = False

    def feed(self, data: bytes) -> list[Response]:
        self.buf = self.buf + data if self.buf else data
        done: list[Response] = []
        while True:
            if self.resp is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return done
                head = self.buf[:end].decode("latin-1")
                self.buf = self.buf[end + 4 :]
                lines = head.split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                resp = self.resp = Response(status, headers)
                if self.on_head is not None:
                    self.on_head(resp)
                if status in _NO_BODY or status < 200 or self.head_request:
                    self.resp = None
                    done.append(resp)
                    continue
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    self.chunked = True
                    self.remaining = 0
                else:
                    self.chunked = False
                    cl = headers.get("content-length")
                    self.remaining = int(cl) if cl is not None else -1
                    if self.remaining == 0:
                        self.resp = None
                        done.append(resp)
                        continue
            if not self._body():
                return done
            done.append(self.resp)
            self.resp = None

    def _emit(self, piece: bytes) -> None:
        if self.on_body is not None:
            self.on_body(piece)
        else:
            assert self.resp is not None
            self.resp.chunks.append(piece)

    def _finish(self) -> bool:
        resp = self.resp
        assert resp is not None
        if resp.chunks:
            resp.body = b"".join(resp.chunks)
            resp.chunks = []
        return True

    def _body(self) -> bool:
        """Consume body bytes from the buffer; True when the response is complete."""
        if not self.chunked:
            if self.remaining < 0:  # read until close: hand over what we have
                if self.buf:
                    self._emit(self.buf)
                    self.buf = b""
                return False
            take = self.buf[: self.remaining]
            if take:
                self._emit(take)
                self.buf = self.buf[len(take) :]
                self.remaining -= len(take)
            return self.remaining == 0 and self._finish()
        while True:
            if self.remaining > 0:
                take = self.buf[: self.remaining]
                if not take:
                    return False
                self._emit(take)
                self.buf = self.buf[len(take) :]
                self.remaining -= len(take)
                if self.remaining > 0:
                    return False
                self.remaining = -2  # expect CRLF after chunk data
            if self.remaining == -2:
                if len(self.buf) < 2:
                    return False
                self.buf = self.buf[2:]
                self.remaining = 0
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(self.buf[:line_end].split(b";", 1)[0], 16)
            if size == 0:
                # last chunk: skip (empty) trailers
                trailer_end = self.buf.find(b"\r\n\r\n", line_end)
                if trailer_end == line_end or self.buf[line_end + 2 : line_end + 4] == b"\r\n":
                    self.buf = self.buf[line_end + 4 :]
                elif trailer_end < 0:
                    return False
                else:
                    self.buf = self.buf[trailer_end + 4 :]
                return self._finish()
            self.buf = self.buf[line_end + 2 :]
            self.remaining = size


class SyncClient:
    """Blocking keep-alive client for setup and verification (not for the measured load)."""

    def __init__(self, target: Target, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.parser = ResponseParser()

    def _connect(self) -> socket.socket:
        target = self.target
        sock = socket.create_connection((target.host, target.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = target.tls()
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=target.host)
            except BaseException:
                sock.close()
                raise
        self.parser = ResponseParser()
        self.sock = sock
        return sock

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> Response:
        data = build_request(method, path, self.target, body, headers)
        for attempt in (0, 1):
            sock = self.sock or self._connect()
            try:
                sock.sendall(data)
                self.parser.head_request = method == "HEAD"
                while True:
                    chunk = sock.recv(1 << 18)
                    if not chunk:
                        raise ConnectionError("server closed the connection")
                    done = self.parser.feed(chunk)
                    if done:
                        resp = done[0]
                        if resp.headers.get("connection", "").lower() == "close":
                            self.close()
                        return resp
            except (ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def read_chunks(self, path: str) -> list[bytes]:
        """Catch-up read from the start, following Stream-Next-Offset until up to date.

        Returns each response body separately (JSON streams answer one array per response).
        """
        offset = "-1"
        parts: list[bytes] = []
        while True:
            resp = self.request("GET", f"{path}?offset={offset}")
            if resp.status != 200:
                raise RuntimeError(f"GET {path} offset={offset}: HTTP {resp.status}")
            parts.append(resp.body)
            offset = resp.headers["stream-next-offset"]
            if resp.headers.get("stream-up-to-date") == "true" or not resp.body:
                return parts

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The RPC's sans-IO core: typed frame constructors and the two ends' state machines.

Like h11 for HTTP, this module moves no bytes and knows no clock: the caller's side
(`CallerProtocol`, used by common/rpc_client.py) and the shard's side (`ShardProtocol`,
used by shard/rpc_server.py) are fed decoded, checked frames (common/wire.py) and answer
with frames to send and with what happened to which request. The trio transport that
moves the bytes for both is common/rpc_transport.py.

One connection goes through

    handshake (hello -> hello -> auth -> ready, common/cluster_auth.py)
    -> ready: req -> (res [more] -> chunk* | err), cancel at any time, both ways many
       requests at once, each named by its caller-chosen id

and each side refuses what the other may not send at that point (a request before the
caller proved itself, a second `res` for one request, a chunk before its `res`, a kind
only the other side sends) by raising ProtocolError: the connection is dropped, nothing
else. Frames received are the dicts `wire.parse` made of them, frames to send the
positional lists built by the constructors below: building objects per frame would cost
more than the checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from ds_cluster.common import wire
from ds_cluster.common.cluster_auth import AuthError, ClientHandshake, ServerHandshake
from ds_cluster.common.ring import Ring

MAX_CALLS = 50_000  # requests a shard runs at once per connection (one gateway's clients)


class ProtocolError(wire.WireError):
    """The peer broke the request lifecycle: drop the connection (a WireError, so every
    reader that drops a connection on a malformed frame drops it on this too)."""


# ---- frame constructors ------------------------------------------------------------------
#
# Frames to send are built in their positional layout (see common/wire.py), which
# `wire.encode_parts` packs as it is: no dict per frame to build and to read back.


def request(call_id: int, op: str, ring_version: int, fields: wire.RequestFields) -> wire.Outgoing:
    """A `req` frame: an http op's m/p/q/h/t/b, or another op's `a`, from `fields`."""
    return wire.request_items(call_id, op, ring_version, fields)


def response(
    call_id: int,
    status: int,
    headers: Sequence[Sequence[str]],
    body: bytes,
    more: bool,
    token: bytes = b"",
    hit: bool = False,
) -> wire.Outgoing:
    """An http op's `res`: status, headers, body, and whether `chunk`s follow; `token`
    names the body (b"": no token), `hit` says the body is left out because it is the
    one the request's token names (`body` is then b"").

    `headers` go out as they are (msgpack writes any sequence as an array; the reader
    gets lists): the core's tuples are not copied into lists."""
    return [wire.RES_HTTP, call_id, status, more, headers, token, hit, body]


def result(call_id: int, args: wire.Args) -> wire.Outgoing:
    """A non-http op's `res`: its result map (the reader sees status 200, no headers,
    no body)."""
    return [wire.RES_OP, call_id, args]


def chunk(call_id: int, body: bytes, more: bool) -> wire.Outgoing:
    return [wire.CHUNK, call_id, more, body]


def cancel(call_id: int) -> wire.Outgoing:
    return [wire.CANCEL, call_id]


def error(call_id: int, code: str, msg: str, args: wire.Args | None = None) -> wire.Outgoing:
    """An `err` (code: one of wire.ERROR_CODES; args: what the code's contract says)."""
    return [wire.ERR, call_id, code, msg, args]


def ring_error(call_id: int, code: str, msg: str, ring: Ring) -> wire.Outgoing:
    """`err version` or `err misdirected`: refused unrun, with the shard's ring."""
    return error(call_id, code, msg, {"ring": ring.to_wire()})


# ---- the caller's side -------------------------------------------------------------------


class CallState:
    """What the caller's state machine tracks of one request; the client's `Call`
    extends it (one object per request, no second map)."""

    __slots__ = ("answered", "id", "sent")

    def __init__(self) -> None:
        self.id = 0  # set when the request is made
        self.answered = False  # its `res` has arrived (a second one is a protocol error)
        self.sent = False  # its frame was handed to the socket (the shard may act on it)


C = TypeVar("C", bound=CallState)


class CallerProtocol(Generic[C]):
    """One connection, the caller's end: the handshake, then requests and their replies.

    `hello()`, then `on_handshake(frame)` for each frame until it returns None (ready);
    then `request()` per request, `on_frame()` per frame received, `abandon()` when a
    request's caller gives up, `lost()` when the connection ends."""

    def __init__(self, handshake: ClientHandshake) -> None:
        self._handshake = handshake
        self.ready = False
        self.health: dict[str, str] = {}
        self.peer_ring: wire.RingInfo | None = None
        self.pending: dict[int, C] = {}  # requests sent or queued, not yet complete
        self.last_id = 0  # the id of the latest request (a caller may take the next itself)

    # -- handshake
    def hello(self) -> wire.HelloFrame:
        return self._handshake.hello()

    def on_handshake(self, frame: wire.Frame) -> wire.AuthFrame | None:
        """The shard's hello -> our auth; its ready -> None (requests may go). AuthError
        for anything else, or a proof that does not verify."""
        if self.peer_ring is None and frame["k"] == "hello":
            return self._handshake.on_server_hello(frame)
        self.health = self._handshake.on_ready(frame)
        self.peer_ring = self._handshake.peer_ring
        self.ready = True
        return None

    # -- requests
    def request(
        self, op: str, fields: wire.RequestFields, call: C, ring_version: int
    ) -> wire.Outgoing:
        """The `req` frame for `call` (given its id, now pending), sent as from a caller
        on ring `ring_version` (its newest)."""
        if not self.ready:
            raise AuthError("not ready", "request before the handshake completed")
        self.last_id += 1
        call.id = self.last_id
        self.pending[call.id] = call
        return request(call.id, op, ring_version, fields)

    def on_frame(self, frame: wire.Frame) -> C | None:
        """The pending request `frame` answers (None: one already given up, or done);
        the request leaves `pending` with its last frame. ProtocolError for a frame a
        shard may not send here."""
        if frame["k"] == "res":  # the most frequent: every request's answer
            call = self.pending.get(frame["i"])
            if call is None:
                return None
            if call.answered:
                raise ProtocolError("a second response to one request")
            call.answered = True
            if not frame["more"]:
                del self.pending[call.id]
            return call
        if frame["k"] == "chunk":
            call = self.pending.get(frame["i"])
            if call is None:
                return None
            if not call.answered:
                raise ProtocolError("a chunk before its response")
            if not frame["more"]:
                del self.pending[call.id]
            return call
        if frame["k"] == "err":
            return self.pending.pop(frame["i"], None)
        raise ProtocolError(f"unexpected {frame['k']!r} frame from a shard")

    def abandon(self, call: C) -> bool:
        """The caller gave `call` up; True if the shard may still be working on it (a
        `cancel` is due, once the request itself was sent)."""
        return self.pending.pop(call.id, None) is not None

    def lost(self) -> list[C]:
        """The connection ended: every pending request, now failed."""
        calls = list(self.pending.values())
        self.pending.clear()
        self.ready = False
        return calls


# ---- the shard's side --------------------------------------------------------------------

H = TypeVar("H")


class ShardProtocol(Generic[H]):
    """One connection, the shard's end: the handshake, then requests in flight.

    `on_handshake(frame, health)` until `authenticated`; then per request frame
    `admit(frame, ring)` (None: run it, and `started(id, handle)`; else the frame that
    answers it at once), per cancel `on_cancel(frame)` (the handle to stop), and
    `finished(id)` when a request's task ends. `H` is whatever the runtime stops a
    request with (a trio cancel scope)."""

    def __init__(self, handshake: ServerHandshake, max_calls: int = MAX_CALLS) -> None:
        self._handshake = handshake
        self._max_calls = max_calls
        self.calls: dict[int, H] = {}

    @property
    def authenticated(self) -> bool:
        return self._handshake.authenticated

    @property
    def peer(self) -> str:
        return self._handshake.peer

    def on_handshake(
        self, frame: wire.Frame, health: Mapping[str, str]
    ) -> wire.HelloFrame | wire.ReadyFrame:
        """The caller's hello -> our hello; its auth -> ready. AuthError otherwise."""
        if frame["k"] == "hello":
            return self._handshake.on_client_hello(frame)
        return self._handshake.on_auth(frame, dict(health))

    def admit(self, frame: wire.RequestFrame, ring: Ring) -> wire.Outgoing | None:
        """Whether the request runs: None (yes), or the `err` that answers it unrun:
        a caller on another ring (`version`, for ops that depend on the ring) or too many
        requests in flight. A request id already in flight is a ProtocolError."""
        call_id = frame["i"]
        if call_id in self.calls:
            raise ProtocolError(f"request id {call_id} already in flight")
        if frame["r"] != ring.version and not wire.ring_free(frame["op"]):
            msg = f"ring version {frame['r']} is not this shard's ({ring.version})"
            return ring_error(call_id, "version", msg, ring)
        if len(self.calls) >= self._max_calls:
            msg = f"over {self._max_calls} requests in flight on this connection"
            return error(call_id, "unavailable", msg)
        return None

    def admits(self, call_id: int, ring_version: int, ring: Ring) -> bool:
        """Whether `admit` would let an http request with this id and ring version run
        (False: it answers it, unrun), without building its answer. A request id already
        in flight is a ProtocolError, as there."""
        calls = self.calls
        if call_id in calls:
            raise ProtocolError(f"request id {call_id} already in flight")
        return ring_version == ring.version and len(calls) < self._max_calls

    def started(self, call_id: int, handle: H) -> None:
        self.calls[call_id] = handle

    def on_cancel(self, frame: wire.CancelFrame) -> H | None:
        """The request to stop (None: already finished, or never started)."""
        return self.calls.get(frame["i"])

    def finished(self, call_id: int) -> None:
        self.calls.pop(call_id, None)

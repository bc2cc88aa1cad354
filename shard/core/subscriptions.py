"""Subscriptions (PROTOCOL.md sections 6, 7, 12.8-12.10): every rule, no I/O.

A subscription is a durable cursor over a set of streams (matched by a glob `pattern`
and/or linked explicitly) that wakes one worker at a time when any of them has data past
its acked offset. This module decides: what a create request means (`parse_config`,
`config_hash`), which URLs may receive webhooks (`check_webhook_url`), which paths a
pattern matches (`glob_match`), and how a subscription's state moves (`Sub` and the
functions below: links, wakes, generation fencing, leases, acks, webhook retries). The
runtime (`shard/subscriptions/`) persists the state, talks to other shards and sends the
HTTP requests; time, randomness and identifiers are passed in.

Offsets are the streams' offset tokens (fixed width, so string order is offset order);
`BEFORE_FIRST` ("-1") sorts before every token and means "nothing processed yet".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from ds_cluster.shard.core.offsets import encode

DEFAULT_LEASE_TTL_MS = 30_000
MIN_LEASE_TTL_MS = 1_000
MAX_LEASE_TTL_MS = 600_000
BEFORE_FIRST = "-1"
ZERO_OFFSET = encode(0)  # the tail of an empty or absent stream
MAX_ID_BYTES = 200
MAX_STREAMS_PER_REQUEST = 1_000
MAX_DESCRIPTION = 1_000
MAX_URL = 2_000
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
RETRY_JITTER = 0.2
TOKEN_TTL_S = 3_600
RESERVED = "__ds"

Kind = Literal["webhook", "pull-wake"]
Change = Literal["", "tail", "links"]


class SubError(Exception):
    """A refused subscription request: HTTP status, error code, message (and extra
    fields for the error object)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}


def invalid(message: str) -> SubError:
    return SubError(400, "INVALID_REQUEST", message)


# -- paths and globs -------------------------------------------------------------------------


def normalize_path(path: str) -> str:
    """A stream-root-relative path as bodies carry it, without surrounding slashes."""
    return path.strip("/")


def check_stream_path(path: object) -> str:
    """A stream path from a request body: a non-empty string, no empty, `.` or `..`
    segment, not under the reserved `__ds` prefix."""
    if not isinstance(path, str):
        raise invalid("streams must contain only strings")
    norm = normalize_path(path)
    if not norm or len(norm.encode("utf-8", "surrogatepass")) > 1024:
        raise invalid("stream paths must be non-empty and at most 1024 bytes")
    segments = norm.split("/")
    if any(s in ("", ".", "..") for s in segments) or any(ord(c) < 0x20 for c in norm):
        raise invalid(f"invalid stream path {norm[:100]!r}")
    if segments[0] == RESERVED:
        raise invalid("stream paths under __ds are reserved")
    return norm


def glob_match(pattern: str, path: str) -> bool:
    """`*` matches exactly one segment, `**` zero or more, anything else itself."""
    return _match(_segments(pattern), 0, _segments(path), 0)


def _segments(path: str) -> list[str]:
    return [s for s in path.strip("/").split("/") if s]


def _match(pattern: list[str], pi: int, path: list[str], si: int) -> bool:
    while pi < len(pattern) and si < len(path):
        seg = pattern[pi]
        if seg == "**":
            return any(_match(pattern, pi + 1, path, i) for i in range(si, len(path) + 1))
        if seg != "*" and seg != path[si]:
            return False
        pi += 1
        si += 1
    while pi < len(pattern) and pattern[pi] == "**":
        pi += 1
    return pi == len(pattern) and si == len(path)


def literal_prefix(pattern: str) -> str:
    """The leading literal segments of `pattern`, joined with a trailing `/` ("" when it
    starts with a wildcard): every path it matches starts with this."""
    out: list[str] = []
    for seg in _segments(pattern):
        if seg in ("*", "**"):
            break
        out.append(seg)
    if len(out) == len(_segments(pattern)):  # no wildcard: the pattern is one path
        return "/".join(out)
    return "".join(f"{s}/" for s in out)


def first_segment(pattern: str) -> str | None:
    """The pattern's first segment if it is literal (an index key), else None."""
    segs = _segments(pattern)
    if not segs or segs[0] in ("*", "**"):
        return None
    return segs[0]


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SubConfig:
    """What a create request configures; two requests are the same subscription iff
    their `config_hash` is equal."""

    type: Kind
    pattern: str | None
    streams: tuple[str, ...]
    webhook_url: str | None
    wake_stream: str | None
    lease_ttl_ms: int
    description: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "pattern": self.pattern,
            "streams": list(self.streams),
            "webhook_url": self.webhook_url,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubConfig:
        return cls(
            type=data["type"],
            pattern=data["pattern"],
            streams=tuple(data["streams"]),
            webhook_url=data["webhook_url"],
            wake_stream=data["wake_stream"],
            lease_ttl_ms=data["lease_ttl_ms"],
            description=data["description"],
        )


def config_hash(config: SubConfig) -> str:
    """SHA-256 of the normalized configuration (streams deduplicated and sorted)."""
    canonical = {**config.to_json(), "streams": sorted(set(config.streams))}
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def parse_json(body: bytes) -> Any:
    if not body:
        return {}
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise invalid("the request body is not valid JSON") from None


def check_id(sub_id: str) -> str:
    if not sub_id or len(sub_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise invalid(f"subscription ids are 1 to {MAX_ID_BYTES} bytes")
    if "/" in sub_id or any(ord(c) < 0x20 for c in sub_id):
        raise invalid("subscription ids contain no '/' and no control characters")
    return sub_id


def parse_config(body: bytes) -> SubConfig:
    """A create request's body, validated (SubError 400 for anything malformed)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    kind = data.get("type")
    if kind not in ("webhook", "pull-wake"):
        raise invalid('type must be "webhook" or "pull-wake"')
    pattern = data.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise invalid("pattern must be a string")
    pattern = normalize_path(pattern) if pattern else None
    if pattern is not None:
        segs = pattern.split("/")
        if len(pattern) > 1024 or any(s in ("", ".", "..") for s in segs):
            raise invalid("pattern must be segments separated by '/'")
        if segs[0] == RESERVED:
            raise invalid("patterns under __ds are reserved")
    raw_streams = data.get("streams")
    if raw_streams is None:
        raw_streams = []
    if not isinstance(raw_streams, list) or len(raw_streams) > MAX_STREAMS_PER_REQUEST:
        raise invalid(f"streams must be a list of at most {MAX_STREAMS_PER_REQUEST} paths")
    streams = tuple(dict.fromkeys(check_stream_path(s) for s in raw_streams))
    if pattern is None and not streams:
        raise invalid("at least one of pattern or streams is required")
    lease = data.get("lease_ttl_ms", DEFAULT_LEASE_TTL_MS)
    if type(lease) is float and lease.is_integer():
        lease = int(lease)
    if type(lease) is not int or not MIN_LEASE_TTL_MS <= lease <= MAX_LEASE_TTL_MS:
        raise invalid(
            f"lease_ttl_ms must be an integer from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}"
        )
    description = data.get("description")
    if description is not None and (
        not isinstance(description, str) or len(description) > MAX_DESCRIPTION
    ):
        raise invalid(f"description must be a string of at most {MAX_DESCRIPTION} characters")
    webhook_url = wake_stream = None
    if kind == "webhook":
        webhook = data.get("webhook")
        url = webhook.get("url") if isinstance(webhook, dict) else None
        if not isinstance(url, str) or not url:
            raise invalid("webhook subscriptions require webhook.url")
        webhook_url = check_webhook_url(url)
    else:
        raw_wake = data.get("wake_stream")
        if not isinstance(raw_wake, str) or not raw_wake:
            raise invalid("pull-wake subscriptions require wake_stream")
        wake_stream = check_stream_path(raw_wake)
    return SubConfig(kind, pattern, streams, webhook_url, wake_stream, lease, description)


def parse_streams_body(body: bytes) -> tuple[str, ...]:
    """`POST .../streams`: {"streams": [...]} with at least one path."""
    data = parse_json(body)
    raw = data.get("streams") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw or len(raw) > MAX_STREAMS_PER_REQUEST:
        raise invalid("streams must be a non-empty list of stream paths")
    return tuple(dict.fromkeys(check_stream_path(s) for s in raw))


# -- webhook URLs (SSRF) ---------------------------------------------------------------------


def _rejected(message: str) -> SubError:
    return SubError(400, "WEBHOOK_URL_REJECTED", message)


def is_local_dev_host(host: str) -> bool:
    """The development exception: `localhost` and 127.0.0.x over http."""
    if host == "localhost":
        return True
    parts = host.split(".")
    return len(parts) == 4 and parts[:3] == ["127", "0", "0"] and parts[3].isdigit()


def check_webhook_url(url: str) -> str:
    """A webhook URL that may be called: https to a public host, or http to localhost /
    127.0.0.x (development). Private, loopback, link-local, multicast, reserved and
    unspecified addresses, IPv6 literals included, are refused (SubError 400
    WEBHOOK_URL_REJECTED). Host names are checked again when resolved at delivery."""
    if len(url) > MAX_URL:
        raise _rejected("webhook.url is too long")
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise _rejected("webhook.url must be a valid URL") from None
    if not host or parts.username is not None or parts.password is not None:
        raise _rejected("webhook.url must name a host and carry no credentials")
    if parts.scheme == "http":
        if is_local_dev_host(host):
            return url
        raise _rejected("http webhook URLs are only allowed for localhost or 127.0.0.x")
    if parts.scheme != "https":
        raise _rejected("webhook.url must use https")
    if host == "localhost" or host.endswith(".localhost"):
        raise _rejected("localhost webhook URLs must use http (development only)")
    if not public_address(host):
        raise _rejected("webhook.url must not target private, loopback or link-local hosts")
    return url


def needs_resolving(url: str) -> str | None:
    """The host name of an accepted webhook URL whose addresses must be checked when it
    is resolved at delivery (`all_public`); None for IP literals (checked when the URL
    was accepted) and for the localhost development exception."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme != "https" or is_local_dev_host(host):
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return None


def all_public(addresses: list[str]) -> bool:
    """Whether a webhook host's resolved addresses are all public (some, and none
    private, loopback, link-local...): a name must not smuggle in what a literal may not."""
    return bool(addresses) and all(
        public_address(a.partition("%")[0]) and _is_ip(a.partition("%")[0]) for a in addresses
    )


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def public_address(host: str) -> bool:
    """False for an IP literal that is not a public unicast address; True for a public
    one and for names (checked once resolved)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


# -- state -----------------------------------------------------------------------------------


@dataclass
class Link:
    """One linked stream: how it is linked, what was processed, the tail last seen."""

    path: str
    explicit: bool = False
    glob: bool = False
    acked: str = BEFORE_FIRST
    tail: str = ZERO_OFFSET

    @property
    def link_type(self) -> str:
        return "explicit" if self.explicit else "glob"

    @property
    def pending(self) -> bool:
        return self.tail > self.acked


@dataclass
class Sub:
    """A subscription's whole durable state, kept by the shard that owns its id.

    The links' `tail`s are a cache: the streams' owners know the truth and are asked
    again whenever a wake ends, so a tail that moved is not worth a write of its own."""

    id: str
    config: SubConfig
    hash: str
    created_at: str
    base_url: str  # scheme://host the subscription was created through (callback URLs)
    links: dict[str, Link] = field(default_factory=dict)
    generation: int = 0
    wake_id: str | None = None
    snapshot: dict[str, str] = field(default_factory=dict)  # path -> tail at the wake
    holder: str | None = None  # pull-wake: the worker holding the lease
    lease_until: float | None = None  # epoch seconds
    status: str = "active"  # "failed" while a webhook retry is scheduled
    delivering: bool = False  # webhook: the wake is not yet accepted by the receiver
    attempts: int = 0  # failed webhook attempts for the current wake
    next_attempt_at: float | None = None  # epoch seconds

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "config": self.config.to_json(),
            "hash": self.hash,
            "created_at": self.created_at,
            "base_url": self.base_url,
            "links": [[k.path, k.explicit, k.glob, k.acked, k.tail] for k in self.links.values()],
            "generation": self.generation,
            "wake_id": self.wake_id,
            "snapshot": self.snapshot,
            "holder": self.holder,
            "lease_until": self.lease_until,
            "status": self.status,
            "delivering": self.delivering,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sub:
        sub = cls(
            id=data["id"],
            config=SubConfig.from_json(data["config"]),
            hash=data["hash"],
            created_at=data["created_at"],
            base_url=data["base_url"],
        )
        for path, explicit, glob, acked, tail in data["links"]:
            sub.links[path] = Link(path, explicit, glob, acked, tail)
        sub.generation = data["generation"]
        sub.wake_id = data["wake_id"]
        sub.snapshot = dict(data["snapshot"])
        sub.holder = data["holder"]
        sub.lease_until = data["lease_until"]
        sub.status = data["status"]
        sub.delivering = data["delivering"]
        sub.attempts = data["attempts"]
        sub.next_attempt_at = data["next_attempt_at"]
        return sub


def matches(config: SubConfig, path: str) -> bool:
    """Whether the pattern links `path`. Never the subscription's own wake stream: its
    wake events would wake it again, for ever."""
    return (
        config.pattern is not None
        and path != config.wake_stream
        and glob_match(config.pattern, path)
    )


def new_sub(
    sub_id: str, config: SubConfig, created_at: str, base_url: str, tails: dict[str, str]
) -> Sub:
    """A new subscription whose explicit streams and backfilled pattern matches
    (`tails`: path -> current tail) are linked at their current tail."""
    sub = Sub(sub_id, config, config_hash(config), created_at, base_url)
    for path in config.streams:
        tail = tails.get(path, ZERO_OFFSET)
        sub.links[path] = Link(path, explicit=True, acked=tail, tail=tail)
    if config.pattern is not None:
        for path, tail in tails.items():
            if matches(config, path):
                link = sub.links.setdefault(path, Link(path, acked=tail, tail=tail))
                link.glob = True
    return sub


def add_explicit(sub: Sub, tails: dict[str, str]) -> None:
    """Explicit links for `tails`' paths at their tail (an existing link keeps its acked
    offset and becomes explicit too)."""
    for path, tail in tails.items():
        link = sub.links.get(path)
        if link is None:
            sub.links[path] = Link(path, explicit=True, acked=tail, tail=tail)
        else:
            link.explicit = True
            link.tail = max(link.tail, tail)


def remove_explicit(sub: Sub, path: str) -> None:
    """Drop the explicit link of `path`; a glob link stays while the pattern matches."""
    link = sub.links.get(path)
    if link is None:
        return
    link.explicit = False
    if not link.glob:
        del sub.links[path]


def note_tail(sub: Sub, path: str, tail: str | None) -> Change:
    """A stream's owner reports `path`'s committed tail (None: the stream is gone). A
    stream the pattern matches and that is not linked yet is linked before its first
    data (acked `BEFORE_FIRST`). Returns what changed: "links" (a link came or went:
    to be persisted before the notice is acknowledged), "tail" (a known tail moved:
    tails can always be asked again, see `Sub`) or "" (nothing)."""
    link = sub.links.get(path)
    if tail is None:
        if link is None:
            return ""
        del sub.links[path]
        sub.snapshot.pop(path, None)
        return "links"
    if link is None:
        if not matches(sub.config, path):
            return ""
        link = sub.links[path] = Link(path, glob=True, acked=BEFORE_FIRST, tail=tail)
        return "links"
    if tail > link.tail:
        link.tail = tail
        return "tail"
    return ""


def has_pending(sub: Sub) -> bool:
    return any(link.pending for link in sub.links.values())


def first_pending(sub: Sub) -> str | None:
    return next((link.path for link in sub.links.values() if link.pending), None)


def idle(sub: Sub) -> bool:
    return sub.wake_id is None and sub.holder is None


def should_wake(sub: Sub) -> bool:
    """Pending work on an idle subscription makes a new wake."""
    return idle(sub) and has_pending(sub)


def start_wake(sub: Sub, wake_id: str, now: float) -> None:
    """A new wake: the next generation, the tails it covers, to be delivered from `now`
    on: a webhook POST (the lease starts once the receiver has it) or a pull-wake event
    (then the wake waits for a claim)."""
    sub.generation += 1
    sub.wake_id = wake_id
    sub.snapshot = {link.path: link.tail for link in sub.links.values()}
    sub.holder = None
    sub.lease_until = None
    sub.delivering = True
    sub.attempts = 0
    sub.next_attempt_at = now


def end_wake(sub: Sub) -> None:
    sub.wake_id = None
    sub.snapshot = {}
    sub.holder = None
    sub.lease_until = None
    sub.delivering = False
    sub.attempts = 0
    sub.next_attempt_at = None


def delivered(sub: Sub, now: float, done: bool) -> None:
    """The receiver accepted the webhook (2xx): the lease starts; `{done: true}` acks
    the wake's snapshot and ends the wake at once."""
    sub.status = "active"
    sub.delivering = False
    sub.attempts = 0
    sub.next_attempt_at = None
    if done:
        for path, tail in sub.snapshot.items():
            link = sub.links.get(path)
            if link is not None and tail > link.acked:
                link.acked = tail
        end_wake(sub)
    else:
        sub.lease_until = now + sub.config.lease_ttl_ms / 1000


def retry_delay(attempts: int, unit_random: float) -> float:
    """Seconds before webhook attempt `attempts + 1`: 1 s doubling to 60 s, +-20 %
    (`unit_random` in [0, 1))."""
    base: float = min(RETRY_FIRST_S * 2.0 ** max(0, attempts - 1), RETRY_MAX_S)
    return max(0.0, base * (1 + RETRY_JITTER * (2 * unit_random - 1)))


def delivery_failed(sub: Sub, now: float, unit_random: float) -> None:
    """The attempt failed: tried again after `retry_delay`; a webhook subscription is
    `failed` until a later attempt succeeds."""
    sub.attempts += 1
    if sub.config.type == "webhook":
        sub.status = "failed"
    sub.next_attempt_at = now + retry_delay(sub.attempts, unit_random)


def event_written(sub: Sub) -> None:
    """A pull-wake wake's event is in the wake stream: the wake waits for a claim."""
    sub.delivering = False
    sub.attempts = 0
    sub.next_attempt_at = None


def claim(sub: Sub, worker: str, now: float) -> None:
    """A pull-wake worker takes the lease (the caller made sure a wake exists)."""
    if sub.config.type != "pull-wake":
        raise invalid("subscription is not pull-wake")
    if sub.holder is not None:
        raise SubError(
            409,
            "ALREADY_CLAIMED",
            "another worker holds the lease",
            current_holder=sub.holder,
            generation=sub.generation,
        )
    sub.holder = worker
    sub.lease_until = now + sub.config.lease_ttl_ms / 1000


def lease_expired(sub: Sub, now: float) -> bool:
    """A lease past its end clears the holder and the wake (the caller wakes again if
    work is pending). Returns whether it had expired."""
    if sub.lease_until is None or now < sub.lease_until or sub.delivering:
        return False
    end_wake(sub)
    return True


def check_fence(sub: Sub, claims: TokenClaims, generation: object, wake_id: object) -> None:
    """Token, request generation and wake id must all match the current wake (409 FENCED
    otherwise)."""
    if (
        sub.wake_id is None
        or claims.generation != sub.generation
        or claims.wake_id != sub.wake_id
        or type(generation) is not int
        or generation != sub.generation
        or wake_id != sub.wake_id
    ):
        raise SubError(409, "FENCED", "wake generation is stale")


def parse_acks(data: dict[str, Any]) -> list[tuple[str, str]]:
    raw = data.get("acks")
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_STREAMS_PER_REQUEST:
        raise invalid("acks must be a list")
    acks: list[tuple[str, str]] = []
    for ack in raw:
        path = ack.get("stream", ack.get("path")) if isinstance(ack, dict) else None
        offset = ack.get("offset") if isinstance(ack, dict) else None
        if not isinstance(path, str) or not isinstance(offset, str):
            raise invalid("each ack is {stream, offset}")
        acks.append((normalize_path(path), offset))
    return acks


def check_acks(sub: Sub, acks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Acks that can be applied: a linked stream, a real offset, not behind the acked
    offset, not past the known tail (409 INVALID_OFFSET, nothing applied)."""
    for path, offset in acks:
        link = sub.links.get(path)
        if link is None:
            raise SubError(409, "INVALID_OFFSET", "ack names a stream the subscription lacks")
        if offset == BEFORE_FIRST or len(offset) != len(ZERO_OFFSET):
            raise SubError(409, "INVALID_OFFSET", "ack offset is not a stream offset")
        if offset < link.acked:
            raise SubError(409, "INVALID_OFFSET", "ack offset regresses the acked offset")
        if offset > link.tail:
            raise SubError(409, "INVALID_OFFSET", "ack offset is beyond the stream's tail")
    return acks


def apply_acks(sub: Sub, acks: list[tuple[str, str]], now: float, done: bool) -> None:
    """Valid acks move the cursors; the lease is extended, or with `done` the wake ends."""
    for path, offset in acks:
        sub.links[path].acked = offset
    if done:
        end_wake(sub)
    else:
        sub.lease_until = now + sub.config.lease_ttl_ms / 1000


# -- serialization ---------------------------------------------------------------------------


def stream_infos(sub: Sub) -> list[dict[str, Any]]:
    return [
        {
            "path": link.path,
            "link_type": link.link_type,
            "acked_offset": link.acked,
            "tail_offset": link.tail,
            "has_pending": link.pending,
        }
        for link in sub.links.values()
    ]


def describe(sub: Sub, kid: str) -> dict[str, Any]:
    """The GET / PUT answer body. No secret: the signing key is public (JWKS)."""
    config = sub.config
    webhook = None
    if config.webhook_url is not None:
        signing = {
            "alg": "ed25519",
            "kid": kid,
            "jwks_url": f"{sub.base_url}/v1/stream/__ds/jwks.json",
        }
        webhook = {"url": config.webhook_url, "signing": signing}
    return {
        "id": sub.id,
        "subscription_id": sub.id,
        "type": config.type,
        "pattern": config.pattern,
        "streams": [
            {"path": link.path, "link_type": link.link_type, "acked_offset": link.acked}
            for link in sub.links.values()
        ],
        "webhook": webhook,
        "wake_stream": config.wake_stream,
        "lease_ttl_ms": config.lease_ttl_ms,
        "created_at": sub.created_at,
        "status": sub.status,
        "description": config.description,
    }


def action_url(sub: Sub, action: str) -> str:
    return f"{sub.base_url}/v1/stream/__ds/subscriptions/{quote(sub.id, safe='')}/{action}"


def webhook_body(sub: Sub, token: str) -> bytes:
    """The webhook request body (signed as sent)."""
    payload = {
        "subscription_id": sub.id,
        "wake_id": sub.wake_id,
        "generation": sub.generation,
        "streams": stream_infos(sub),
        "callback_url": action_url(sub, "callback"),
        "callback_token": token,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def wake_event(sub: Sub, stream: str, now_ms: int) -> bytes:
    event = {
        "type": "wake",
        "subscription_id": sub.id,
        "stream": stream,
        "generation": sub.generation,
        "ts": now_ms,
    }
    return json.dumps(event, separators=(",", ":")).encode()


def claim_body(sub: Sub, token: str) -> dict[str, Any]:
    return {
        "wake_id": sub.wake_id,
        "generation": sub.generation,
        "token": token,
        "streams": stream_infos(sub),
        "lease_ttl_ms": sub.config.lease_ttl_ms,
    }


# -- callback and claim tokens ---------------------------------------------------------------


@dataclass(frozen=True)
class TokenClaims:
    sub: str
    generation: int
    wake_id: str
    exp: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(key: bytes, sub: Sub, now: float) -> str:
    """An HMAC-SHA256 signed token for the current wake: subscription, generation, wake
    id and expiry. Not a service credential: it only authorizes this wake's requests."""
    claims = {
        "sub": sub.id,
        "gen": sub.generation,
        "wake": sub.wake_id,
        "exp": int(now) + TOKEN_TTL_S,
    }
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signature = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    return f"{payload}.{signature}"


def read_token(key: bytes, token: str, sub_id: str, now: float) -> TokenClaims:
    """The claims of a valid token for `sub_id` (SubError 401 otherwise)."""
    bad = SubError(401, "TOKEN_INVALID", "token invalid")
    payload, dot, signature = token.partition(".")
    if not dot or len(token) > 4096:
        raise bad
    expected = _b64(hmac.new(key, payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature):
        raise bad
    try:
        data = json.loads(_unb64(payload))
        claims = TokenClaims(
            str(data["sub"]), int(data["gen"]), str(data["wake"]), int(data["exp"])
        )
    except (ValueError, KeyError, TypeError):
        raise bad from None
    if claims.sub != sub_id:
        raise bad
    if now > claims.exp:
        raise SubError(401, "TOKEN_EXPIRED", "token expired")
    return claims


def bearer(authorization: str | None) -> str:
    if not authorization or not authorization.startswith("Bearer "):
        raise SubError(401, "TOKEN_INVALID", "missing or malformed Authorization header")
    return authorization[len("Bearer ") :].strip()

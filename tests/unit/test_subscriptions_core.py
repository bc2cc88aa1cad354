"""Unit tests of the subscription rules (shard/core/subscriptions.py): no I/O."""

import json

import pytest

from ds_cluster.shard.core import subscriptions as rules
from ds_cluster.shard.core.offsets import encode
from ds_cluster.shard.core.subscriptions import BEFORE_FIRST, ZERO_OFFSET, SubError

KEY = b"k" * 32
NOW = 1_800_000_000.0


def config(**fields: object) -> rules.SubConfig:
    body = {"type": "pull-wake", "pattern": "events/*", "wake_stream": "wake/pool", **fields}
    return rules.parse_config(json.dumps(body).encode())


def webhook(**fields: object) -> rules.SubConfig:
    body = {"type": "webhook", "pattern": "events/*", "webhook": {"url": "https://h.example/x"}}
    return rules.parse_config(json.dumps({**body, **fields}).encode())


def sub_with(tails: dict[str, str], cfg: rules.SubConfig | None = None) -> rules.Sub:
    return rules.new_sub("s1", cfg or config(), "2026-01-01T00:00:00.000Z", "http://gw", tails)


def refused(code: str, fn: object, *args: object) -> SubError:
    with pytest.raises(SubError) as caught:
        fn(*args)  # type: ignore[operator]
    assert caught.value.code == code, caught.value.message
    return caught.value


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("events/*", "events/a", True),
        ("events/*", "events/a/b", False),
        ("events/*", "events", False),
        ("events/**", "events", True),
        ("events/**", "events/a/b/c", True),
        ("**", "anything/at/all", True),
        ("**/x", "a/b/x", True),
        ("**/x", "x", True),
        ("a/*/c", "a/b/c", True),
        ("a/*/c", "a/b/d", False),
        ("a/**/c", "a/c", True),
        ("a/**/c", "a/b/b/c", True),
        ("a/**/c", "a/b/b/d", False),
        ("exact/path", "exact/path", True),
        ("exact/path", "exact/pat", False),
    ],
)
def test_glob(pattern: str, path: str, matches: bool) -> None:
    assert rules.glob_match(pattern, path) is matches


def test_literal_prefix_bounds_every_match() -> None:
    assert rules.literal_prefix("events/*") == "events/"
    assert rules.literal_prefix("a/b/**") == "a/b/"
    assert rules.literal_prefix("**/x") == ""
    assert rules.literal_prefix("one/path") == "one/path"
    assert rules.first_segment("*/x") is None
    assert rules.first_segment("events/*") == "events"


def test_config_hash_is_of_the_normalized_configuration() -> None:
    a = config(streams=["x/1", "x/2", "x/1"], description="d")
    b = config(streams=["x/2", "x/1"], description="d")
    assert rules.config_hash(a) == rules.config_hash(b)
    assert rules.config_hash(a) != rules.config_hash(config(streams=["x/2"], description="d"))
    assert rules.config_hash(a) != rules.config_hash(config(streams=["x/1", "x/2"]))
    assert rules.config_hash(config()) != rules.config_hash(config(lease_ttl_ms=1000))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"type": "other", "pattern": "a/*"}',
        b'{"type": "pull-wake", "wake_stream": "w"}',  # neither pattern nor streams
        b'{"type": "pull-wake", "pattern": "a/*"}',  # no wake stream
        b'{"type": "webhook", "pattern": "a/*"}',  # no url
        b'{"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 999}',
        b'{"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 600001}',
        b'{"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": "1000"}',
        b'{"type": "pull-wake", "streams": ["a", 3], "wake_stream": "w"}',
        b'{"type": "pull-wake", "streams": ["a/../b"], "wake_stream": "w"}',
        b'{"type": "pull-wake", "pattern": "__ds/*", "wake_stream": "w"}',
    ],
)
def test_bad_configurations_are_400(body: bytes) -> None:
    error = refused("INVALID_REQUEST", rules.parse_config, body)
    assert error.status == 400


def test_lease_bounds_and_default() -> None:
    assert config().lease_ttl_ms == rules.DEFAULT_LEASE_TTL_MS
    assert config(lease_ttl_ms=1000).lease_ttl_ms == 1000
    assert config(lease_ttl_ms=600_000).lease_ttl_ms == 600_000


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/x",
        "http://localhost:8080/hook",
        "http://127.0.0.1:9/hook",
        "http://127.0.0.7/hook",
        "https://8.8.8.8/x",
    ],
)
def test_webhook_urls_allowed(url: str) -> None:
    assert rules.check_webhook_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/hook",  # the suite's case
        "http://hooks.example.com/x",  # http is for localhost only
        "https://10.1.2.3/x",
        "https://192.168.1.1/x",
        "https://172.16.0.1/x",
        "https://169.254.169.254/latest/meta-data",  # cloud metadata
        "https://127.0.0.1/x",
        "https://[::1]/x",
        "https://[fe80::1]/x",
        "https://[::ffff:10.0.0.1]/x",
        "https://0.0.0.0/x",
        "https://localhost/x",
        "ftp://hooks.example.com/x",
        "https://user:pw@hooks.example.com/x",
        "http://127.0.1.1/x",  # only 127.0.0.x is the development exception
        "not a url",
    ],
)
def test_webhook_urls_rejected(url: str) -> None:
    error = refused("WEBHOOK_URL_REJECTED", rules.check_webhook_url, url)
    assert error.status == 400


def test_creation_links_at_the_tail_so_nothing_is_pending() -> None:
    tails = {"events/a": encode(5), "other/b": encode(3), "manual/x": encode(2)}
    sub = sub_with(tails, config(streams=["manual/x"]))
    assert set(sub.links) == {"events/a", "manual/x"}
    assert sub.links["manual/x"].link_type == "explicit"
    assert sub.links["events/a"].acked == encode(5)
    assert not rules.has_pending(sub)
    assert not rules.should_wake(sub)


def test_a_new_matching_stream_is_linked_before_its_first_data() -> None:
    sub = sub_with({})
    assert not rules.note_tail(sub, "other/x", encode(4))  # no match: ignored
    assert rules.note_tail(sub, "events/new", encode(4))
    assert sub.links["events/new"].acked == BEFORE_FIRST
    assert rules.should_wake(sub)
    assert not rules.note_tail(sub, "events/new", encode(3))  # tails only grow
    assert rules.note_tail(sub, "events/new", None)  # the stream is gone
    assert "events/new" not in sub.links


def test_explicit_and_glob_links() -> None:
    sub = sub_with({"events/a": encode(1)})
    rules.add_explicit(sub, {"events/a": encode(1), "m/b": ZERO_OFFSET})
    assert sub.links["events/a"].link_type == "explicit"
    rules.remove_explicit(sub, "events/a")
    assert sub.links["events/a"].link_type == "glob"  # the pattern still matches
    rules.remove_explicit(sub, "m/b")
    assert "m/b" not in sub.links
    rules.remove_explicit(sub, "m/absent")  # idempotent


def woken(sub: rules.Sub, wake_id: str = "w1") -> rules.Sub:
    assert rules.should_wake(sub)
    rules.start_wake(sub, wake_id, NOW)
    return sub


def test_pull_wake_claim_ack_done() -> None:
    sub = sub_with({"events/a": encode(1)})
    rules.note_tail(sub, "events/a", encode(9))
    woken(sub)
    assert sub.generation == 1 and not rules.should_wake(sub)
    rules.claim(sub, "worker-1", NOW)
    error = refused("ALREADY_CLAIMED", rules.claim, sub, "worker-2", NOW)
    assert error.extra == {"current_holder": "worker-1", "generation": 1}
    token = rules.make_token(KEY, sub, NOW)
    claims = rules.read_token(KEY, token, "s1", NOW)
    rules.check_fence(sub, claims, 1, "w1")
    acks = rules.check_acks(sub, [("events/a", encode(9))])
    rules.apply_acks(sub, acks, NOW, done=True)
    assert sub.links["events/a"].acked == encode(9)
    assert rules.idle(sub) and not rules.has_pending(sub)
    # the same request again: the wake is over
    refused("FENCED", rules.check_fence, sub, claims, 1, "w1")


def test_fencing_needs_token_generation_and_wake_id_to_match() -> None:
    sub = woken(_pending_sub())
    claims = rules.read_token(KEY, rules.make_token(KEY, sub, NOW), "s1", NOW)
    refused("FENCED", rules.check_fence, sub, claims, 2, "w1")
    refused("FENCED", rules.check_fence, sub, claims, 1, "w2")
    refused("FENCED", rules.check_fence, sub, claims, "1", "w1")
    rules.end_wake(sub)
    rules.note_tail(sub, "events/a", encode(20))
    woken(sub, "w2")  # generation 2: generation 1's token is stale
    refused("FENCED", rules.check_fence, sub, claims, 2, "w2")


def _pending_sub() -> rules.Sub:
    sub = sub_with({"events/a": encode(1)})
    rules.note_tail(sub, "events/a", encode(2))
    return sub


def test_tokens_are_signed_scoped_and_expire() -> None:
    sub = woken(_pending_sub())
    token = rules.make_token(KEY, sub, NOW)
    refused("TOKEN_INVALID", rules.read_token, b"other key", token, "s1", NOW)
    refused("TOKEN_INVALID", rules.read_token, KEY, token, "s2", NOW)
    refused("TOKEN_INVALID", rules.read_token, KEY, token[:-2] + "xx", "s1", NOW)
    refused("TOKEN_INVALID", rules.read_token, KEY, "garbage", "s1", NOW)
    refused("TOKEN_EXPIRED", rules.read_token, KEY, token, "s1", NOW + rules.TOKEN_TTL_S + 1)
    refused("TOKEN_INVALID", rules.bearer, None)
    refused("TOKEN_INVALID", rules.bearer, "Basic abc")
    assert rules.bearer(f"Bearer {token}") == token


def test_acks_are_checked_before_any_applies() -> None:
    sub = woken(_pending_sub())
    refused("INVALID_OFFSET", rules.check_acks, sub, [("events/zzz", encode(1))])
    refused("INVALID_OFFSET", rules.check_acks, sub, [("events/a", BEFORE_FIRST)])
    refused("INVALID_OFFSET", rules.check_acks, sub, [("events/a", encode(0))])  # regresses
    refused("INVALID_OFFSET", rules.check_acks, sub, [("events/a", encode(3))])  # past tail
    assert sub.links["events/a"].acked == encode(1)
    rules.apply_acks(sub, [("events/a", encode(2))], NOW, done=False)  # a heartbeat
    assert sub.lease_until == NOW + sub.config.lease_ttl_ms / 1000
    assert sub.wake_id == "w1"


def test_an_expired_lease_clears_the_wake_and_pending_work_wakes_again() -> None:
    sub = woken(_pending_sub())
    rules.event_written(sub)
    rules.claim(sub, "w", NOW)
    assert not rules.lease_expired(sub, NOW + 1)
    assert rules.lease_expired(sub, NOW + sub.config.lease_ttl_ms / 1000)
    assert sub.holder is None and sub.wake_id is None
    woken(sub, "w2")
    assert sub.generation == 2


def test_webhook_done_acks_the_snapshot_only() -> None:
    sub = woken(_pending_sub_webhook())
    assert sub.delivering and sub.snapshot == {"events/a": encode(2)}
    rules.note_tail(sub, "events/a", encode(7))  # after the snapshot
    rules.delivered(sub, NOW, done=True)
    assert sub.links["events/a"].acked == encode(2)
    assert rules.should_wake(sub)  # the later data wakes again, next generation


def test_webhook_accepted_without_done_starts_the_lease() -> None:
    sub = woken(_pending_sub_webhook())
    rules.delivered(sub, NOW, done=False)
    assert sub.lease_until == NOW + sub.config.lease_ttl_ms / 1000
    assert not sub.delivering and sub.wake_id == "w1"


def test_webhook_failures_back_off_with_jitter_and_mark_failed() -> None:
    sub = woken(_pending_sub_webhook())
    rules.delivery_failed(sub, NOW, 0.5)
    assert sub.status == "failed" and sub.next_attempt_at == NOW + 1.0
    assert not rules.lease_expired(sub, NOW + 10_000)  # no lease while delivering
    delays = [rules.retry_delay(n, 0.5) for n in range(1, 10)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert rules.retry_delay(1, 0.0) == pytest.approx(0.8)
    assert rules.retry_delay(7, 0.999999) == pytest.approx(72, rel=1e-4)
    rules.delivered(sub, NOW, done=False)
    assert sub.status == "active" and sub.attempts == 0


def _pending_sub_webhook() -> rules.Sub:
    sub = sub_with({"events/a": encode(1)}, webhook())
    rules.note_tail(sub, "events/a", encode(2))
    return sub


def test_state_round_trips_through_json() -> None:
    sub = woken(_pending_sub_webhook())
    rules.delivery_failed(sub, NOW, 0.3)
    again = rules.Sub.from_json(json.loads(json.dumps(sub.to_json())))
    assert again == sub


def test_descriptions_hold_no_secret() -> None:
    sub = _pending_sub_webhook()
    body = rules.describe(sub, "ds_kid")
    assert body["webhook"]["signing"] == {
        "alg": "ed25519",
        "kid": "ds_kid",
        "jwks_url": "http://gw/v1/stream/__ds/jwks.json",
    }
    assert "secret" not in json.dumps(body)
    payload = json.loads(rules.webhook_body(woken(sub), "tok"))
    assert payload["callback_url"] == "http://gw/v1/stream/__ds/subscriptions/s1/callback"
    assert payload["streams"][0]["has_pending"] is True


def test_a_pull_wake_event_is_retried_without_failing_the_subscription() -> None:
    sub = woken(_pending_sub())
    assert sub.delivering  # the wake event is still to be appended
    rules.delivery_failed(sub, NOW, 0.5)
    assert sub.status == "active" and sub.next_attempt_at == NOW + 1.0
    rules.event_written(sub)
    assert not sub.delivering and sub.next_attempt_at is None and sub.wake_id == "w1"


def test_a_pattern_never_links_its_own_wake_stream() -> None:
    cfg = config(pattern="**", wake_stream="wake/pool")
    sub = sub_with({"wake/pool": encode(3), "events/a": encode(1)}, cfg)
    assert set(sub.links) == {"events/a"}
    assert not rules.note_tail(sub, "wake/pool", encode(4))
    assert rules.note_tail(sub, "wake/other", encode(4)) == "links"


def test_webhook_host_names_are_checked_once_resolved() -> None:
    assert rules.needs_resolving("https://hooks.example.com/x") == "hooks.example.com"
    assert rules.needs_resolving("https://8.8.8.8/x") is None  # checked when accepted
    assert rules.needs_resolving("http://localhost:9/x") is None  # development exception
    assert rules.all_public(["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
    assert not rules.all_public([])
    assert not rules.all_public(["93.184.216.34", "10.0.0.7"])  # one private is enough
    assert not rules.all_public(["169.254.169.254"])
    assert not rules.all_public(["::1"])
    assert not rules.all_public(["fe80::1%eth0"])

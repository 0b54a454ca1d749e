"""The guarded kombu channel: what it copies from kombu is still what kombu does."""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
from typing import Any

import pytest
from kombu.transport import redis as kombu_redis

from workers.transport import REFUSAL_PROPERTY, GuardedChannel, envelope_problem, quarantine

#: sha256 of kombu 5.7.0's ``Channel._brpop_read``, which GuardedChannel copies.
KOMBU_BRPOP_READ_SHA256 = "c42518699709f2df90f55a048fe6346612ae5527e5c4a6819f2c0920dc62088f"


#: sha256 of kombu 5.7.0's ``QoS.append``, which LeanQoS mirrors.
KOMBU_QOS_APPEND_SHA256 = "35c655f6ecc62fe6e9902f7498dde9b47ff27187973d7568e02529c400027416"


@pytest.mark.parametrize(
    ("kombu_method", "digest", "ours"),
    [
        (
            kombu_redis.Channel._brpop_read,
            KOMBU_BRPOP_READ_SHA256,
            "workers/transport.py GuardedChannel._brpop_read",
        ),
        (kombu_redis.QoS.append, KOMBU_QOS_APPEND_SHA256, "workers/leanchannel.py LeanQoS.append"),
    ],
)
def test_the_kombu_methods_we_mirror_are_unchanged_in_the_installed_kombu(
    kombu_method: Any, digest: str, ours: str
) -> None:
    source = inspect.getsource(kombu_method)
    assert hashlib.sha256(source.encode()).hexdigest() == digest, (
        f"kombu's {kombu_method.__qualname__} changed: compare it with {ours}, then update the hash"
    )


def valid() -> dict[str, Any]:
    return {
        "body": base64.b64encode(b"\x93\x90\x80\x80").decode(),
        "content-type": "application/x-predictq-msgpack",
        "content-encoding": "binary",
        "headers": {"id": "x", "task": "predictq.predict"},
        "properties": {
            "delivery_tag": "t",
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": "q"},
            "priority": 0,
        },
    }


def test_a_valid_envelope_has_no_problem() -> None:
    assert envelope_problem(valid()) is None


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ((), [1], "expected a JSON object as the message envelope"),
        (("properties",), None, "expected 'properties' as an object"),
        (("properties", "delivery_tag"), 7, "delivery_tag as a non-empty string"),
        (("properties", "delivery_tag"), "", "delivery_tag as a non-empty string"),
        (("properties", "delivery_info"), {"exchange": ""}, "delivery_info as an object"),
        (("properties", "priority"), 999, "priority as an integer 0-255"),
        (("properties", "priority"), True, "priority as an integer 0-255"),
        (("properties", "body_encoding"), "rot13", "body_encoding 'base64'"),
        (("content-type",), None, "expected 'content-type' as a string"),
        (("content-encoding",), 5, "expected 'content-encoding' as a string"),
        (("headers",), [], "expected 'headers' as an object"),
        (("body",), None, "expected 'body' as a string"),
        (("body",), "!!!", "expected 'body' as base64 text"),
    ],
)
def test_each_field_kombu_reads_is_checked(
    path: tuple[str, ...], value: object, expected: str
) -> None:
    envelope: Any = valid()
    if not path:
        envelope = value
    else:
        target = envelope
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    problem = envelope_problem(envelope)
    assert problem is not None and expected in problem


def test_a_quarantine_envelope_is_itself_valid_and_keeps_a_bounded_copy() -> None:
    env = quarantine("x" * 100, "why", "q", raw_limit=10, task_id="id1", kind="too_large")
    assert envelope_problem(env) is None
    refusal = env["properties"][REFUSAL_PROPERTY]
    assert refusal == {
        "kind": "too_large",
        "reason": "why",
        "task_id": "id1",
        "raw": "x" * 10,
        "raw_chars": 100,
    }
    assert env["properties"]["delivery_info"]["routing_key"] == "q"


def test_the_guarded_channel_reads_its_limits_from_transport_options() -> None:
    for name in ("predictq_raw_limit", "predictq_max_payload_bytes", "predictq_max_json_bytes"):
        assert name in GuardedChannel.from_transport_options
    assert set(kombu_redis.Channel.from_transport_options) < set(
        GuardedChannel.from_transport_options
    )


def test_the_sentinel_channel_of_workers_is_guarded_and_still_finds_the_master() -> None:
    from kombu.utils.imports import symbol_by_name

    from workers.app import GUARDED_SENTINEL_TRANSPORT
    from workers.transport import GuardedSentinelChannel, SentinelTransport

    # What sentinel:// names in a worker process (workers/app.py's alias).
    assert symbol_by_name(GUARDED_SENTINEL_TRANSPORT) is SentinelTransport
    assert issubclass(SentinelTransport, kombu_redis.SentinelTransport)
    assert SentinelTransport.Channel is GuardedSentinelChannel
    # The guard's methods, and the Sentinel channel's master lookup.
    assert GuardedSentinelChannel._brpop_read is GuardedChannel._brpop_read
    assert GuardedSentinelChannel.Message is GuardedChannel.Message
    assert GuardedSentinelChannel._get_pool is kombu_redis.SentinelChannel._get_pool
    options = set(GuardedSentinelChannel.from_transport_options)
    assert {"master_name", "sentinel_kwargs", "predictq_raw_limit"} <= options


def _consume_one(url: str, queue: str) -> Any:
    """One message received through the workers' transport, left unacknowledged."""
    from kombu import Connection
    from kombu import Queue as KombuQueue

    received: list[Any] = []
    with Connection(url, transport="workers.transport:Transport") as conn:
        channel = conn.channel()
        consumer = conn.Consumer(
            KombuQueue(queue, routing_key=queue),
            on_message=received.append,  # the raw message: its body is not deserialized
            channel=channel,
        )
        with consumer:
            conn.drain_events(timeout=10)
        # Closing without an ack would restore the message: keep the record to read it.
        channel.qos._delivered.clear()
    return received[0]


def test_a_received_message_is_decoded_once_and_recorded_as_kombu_would(
    server: Any, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kombu.transport.virtual import base as virtual_base

    from predictq import kombu_layout

    body = bytes(range(256)) * 700  # ~180 KB: a coalesced message's size
    item = kombu_layout.encode_message(
        body,
        queue=queue,
        content_type="application/x-predictq-msgpack",
        content_encoding="binary",
        headers={"id": "job-1", "task": "predictq.predict"},
        properties={"priority": 0},
        expiration_ms=None,
    )
    decodes: list[int] = []
    original = virtual_base.Base64.decode
    monkeypatch.setattr(
        virtual_base.Base64, "decode", lambda self, s: decodes.append(1) or original(self, s)
    )
    with server.client() as r:
        r.lpush(kombu_layout.list_key(queue), item)
        message = _consume_one(server.url(0), queue)
        assert message.body == body
        assert decodes == []  # the guard's decoding was reused, not done again
        record = r.hget("unacked", message.delivery_tag)
        r.hdel("unacked", message.delivery_tag)
        r.zrem("unacked_index", message.delivery_tag)
    # What kombu's restore path reads back: the envelope as pushed, exchange, routing key.
    assert record is not None
    assert json.loads(record) == [json.loads(item), "", queue]


def test_one_redis_client_serves_a_channel_until_kombu_drops_its_pool(server: Any) -> None:
    from kombu import Connection

    with Connection(server.url(0), transport="workers.transport:Transport") as conn:
        channel = conn.channel()
        first = channel._create_client()
        assert channel._create_client() is first
        assert first.ping()
        channel._pool = None  # what kombu does on close and after connection errors
        second = channel._create_client()
        assert second is not first
        assert second.connection_pool is channel.pool

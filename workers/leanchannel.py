"""Per-message costs kombu's Redis channel pays twice, paid once.

Everything a worker receives passes through one thread: the consumer's event
loop. With coalescing, one message carries the inputs of many jobs (a 15-job
message of 32x32x3 images is ~250 KB of base64), and profiling a storm
(``py-spy --gil`` on the worker, bench's conv net) showed that thread spending
about a third of its time on the message body alone, mostly in work done twice:

- the guard (``workers.transport``) base64-decodes the body to check it, then
  kombu's ``Message`` decodes it again: the guard's result is handed to kombu;
- kombu records the message as unacknowledged by JSON-encoding the envelope it
  just parsed (body included): the text BRPOP returned is stored instead, which
  is the same JSON (``loads`` of it gives the envelope kombu parsed);
- kombu builds a new ``redis.Redis`` client for every command it sends outside
  the event loop (the unacked record, acks, events): one client per pool serves
  them all (redis-py clients are thread-safe; each command takes its own
  connection from the pool).

Mirrors kombu 5.7's ``QoS.append`` (tests/test_transport.py fails when the
installed kombu's version of it changes). Envelopes the guard did not parse
itself (quarantine envelopes, restored messages) take kombu's own path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from time import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual


@dataclass(frozen=True)
class Popped:
    """The item being delivered: its envelope, the text it was parsed from, its body."""

    envelope: dict[str, Any]
    text: str | None  # None: an envelope the guard built (quarantine), not parsed
    body: bytes | None  # None: not base64-decoded yet


class LeanQoS(kombu_redis.QoS):
    """kombu's Redis ack emulation, recording the popped text instead of re-encoding it."""

    def append(self, message: Any, delivery_tag: str) -> None:
        popped: Popped | None = getattr(self.channel, "predictq_popped", None)
        if popped is None or popped.text is None or message._raw is not popped.envelope:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        # The record kombu's restore path reads back: [envelope, exchange, routing key].
        exchange, routing_key = (
            json.dumps(delivery["exchange"]),
            json.dumps(delivery["routing_key"]),
        )
        record = f"[{popped.text}, {exchange}, {routing_key}]"
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time()}).hset(
                self.unacked_key, delivery_tag, record
            ).execute()
            # kombu's virtual QoS: the in-memory record of delivered messages.
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]


class LeanChannel(kombu_redis.Channel):
    """A Redis channel that reuses the guard's decoding and one client per pool."""

    QoS = LeanQoS
    #: Set on the event loop's thread for the duration of one delivery only.
    predictq_popped: Popped | None = None
    _predictq_client: redis.Redis | None = None

    def decode_body(self, body: Any, encoding: str | None = None) -> Any:
        popped = self.predictq_popped
        if popped is not None and popped.body is not None and body is popped.envelope.get("body"):
            return popped.body
        return super().decode_body(body, encoding)  # type: ignore[no-untyped-call]

    def deliver_popped(self, popped: Popped, queue: str) -> None:
        """Hand one checked envelope to kombu, with what was learned while checking it."""
        self.predictq_popped = popped
        try:
            self.connection._deliver(popped.envelope, queue)
        finally:
            self.predictq_popped = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        pool = self.pool
        client = self._predictq_client
        # kombu drops its pools on close and on connection errors: a client is
        # only reused with the pool it was made for.
        if client is None or client.connection_pool is not pool:
            client = super()._create_client()  # type: ignore[no-untyped-call]
            self._predictq_client = client
        return client


__all__ = ["LeanChannel", "LeanQoS", "Popped"]

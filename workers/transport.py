"""kombu's Redis transport, made safe against list items that are not kombu messages.

kombu's Redis channel BRPOPs an item, parses it as JSON and builds a
``Message`` from it; an item that is not JSON, not an object, or lacks the
properties kombu reads (``delivery_tag``, ``delivery_info``, a known
``body_encoding``, a base64 body) raises inside the consumer's event loop. The
worker then dies with the item already popped (the message is lost), or kombu
counts the error as a lost connection and reconnects in a loop.

This channel checks every popped item before kombu reads it. An item kombu
cannot use is replaced by a small, well-formed *quarantine* envelope that says
why it was refused, carries the original text (truncated to
``PREDICTQ_DEAD_LETTER_MAX_BYTES``) and, when one could be read, the task id.
kombu records it as unacknowledged like any message; the consumer's guard
(``workers.guard``) answers it, dead-letters it and acknowledges it. So every
item ends in the same place, and an item is never lost between BRPOP and the
unacked record any more than a valid message is.

Mirrors kombu 5.7's ``kombu.transport.redis.Channel._brpop_read`` (the one
method copied here; ``tests/test_transport.py`` fails when the installed kombu's
version of it changes) and the envelope layout of ``kombu.transport.virtual``.
"""

from __future__ import annotations

import binascii
import uuid
from typing import Any, Final

import pybase64
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.transport.virtual import Message as VirtualMessage
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads as kombu_loads
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from predictq.kombu_layout import loads_envelope
from workers.leanchannel import LeanChannel, Popped

#: The property a quarantine envelope carries: why kombu could not use the item.
REFUSAL_PROPERTY: Final = "predictq_refusal"
#: Text kept of an item that is not a usable message (see ``Settings``).
DEFAULT_RAW_LIMIT: Final = 64 * 1024


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def envelope_problem(payload: object) -> str | None:
    """What makes ``payload`` unusable as a kombu Redis message, or None.

    Checks every field kombu's virtual ``Message``, its Redis ``QoS`` and the
    restore path read, with the types they assume.
    """
    return checked_envelope(payload)[0]


def checked_envelope(payload: object) -> tuple[str | None, bytes | None]:
    """``envelope_problem`` and, for a usable base64 body, the decoded body."""
    if not isinstance(payload, dict):
        return f"expected a JSON object as the message envelope, received {_kind(payload)}", None
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return f"expected 'properties' as an object, received {_kind(properties)}", None
    problem = _properties_problem(properties)
    if problem is not None:
        return problem, None
    for key in ("content-type", "content-encoding"):
        if not _is_str(payload.get(key)):
            return f"expected {key!r} as a string, received {_kind(payload.get(key))}", None
    if not isinstance(payload.get("headers"), dict):
        problem = f"expected 'headers' as an object, received {_kind(payload.get('headers'))}"
        return problem, None
    body = payload.get("body")
    if not _is_str(body):
        return f"expected 'body' as a string, received {_kind(body)}", None
    if properties.get("body_encoding") != "base64":
        return None, None
    try:
        # pybase64: SIMD decoding, ~40x CPython's on this consumer thread, which every
        # message passes through (0.47 -> 0.01 ms for a 250 KB body). Stricter only
        # on excess padding, which no base64 encoder writes.
        return None, pybase64.b64decode(str(body), validate=True)
    except (binascii.Error, ValueError):
        return (
            "expected 'body' as base64 text (properties.body_encoding), received other text",
            None,
        )


def _properties_problem(properties: dict[str, Any]) -> str | None:
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return f"expected properties.delivery_tag as a non-empty string, received {_kind(tag)}"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or not all(
        _is_str(info.get(k)) for k in ("exchange", "routing_key")
    ):
        return (
            "expected properties.delivery_info as an object with string 'exchange' and "
            f"'routing_key', received {_kind(info)}"
        )
    priority = properties.get("priority")
    if priority is not None and not (
        isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255
    ):
        return f"expected properties.priority as an integer 0-255, received {priority!r:.40}"
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        return f"expected properties.body_encoding 'base64', received {encoding!r:.40}"
    return None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"a string ({value!r:.40})"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, dict):
        return f"an object with keys {sorted(map(str, value))[:8]}"
    return f"{type(value).__name__} {value!r:.40}"


def _refused(envelope: dict[str, Any]) -> Popped:
    # A quarantine envelope is built here, not parsed: kombu records it itself.
    return Popped(envelope, None, None)


def _task_id_of(payload: object) -> str | None:
    headers = payload.get("headers") if isinstance(payload, dict) else None
    task_id = headers.get("id") if isinstance(headers, dict) else None
    return task_id if isinstance(task_id, str) and task_id else None


def quarantine(
    text: str,
    reason: str,
    queue: str,
    *,
    raw_limit: int,
    task_id: str | None,
    kind: str = "envelope",
) -> dict[str, Any]:
    """A valid, empty envelope standing for an unusable item of ``queue``."""
    return {
        "body": "",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "body_encoding": "base64",
            "delivery_info": {"exchange": "", "routing_key": queue},
            REFUSAL_PROPERTY: {
                "kind": kind,
                "reason": reason,
                "task_id": task_id,
                "raw": text[:raw_limit],
                "raw_chars": len(text),
            },
        },
    }


def raw_envelope(message: Any) -> dict[str, Any] | None:
    """The envelope a kombu Redis message was built from (kombu's ``Message._raw``)."""
    raw = getattr(message, "_raw", None)
    return raw if isinstance(raw, dict) else None


class GuardedMessage(VirtualMessage):
    """kombu's virtual Message whose ack after a reconnect is a connection error.

    kombu 5.7: once the consumer reconnected, a job that finishes acknowledges
    through its message's old channel, whose client is gone, and kombu raises
    AttributeError ('NoneType' object has no attribute ...) instead of a
    connection error (the family of celery/kombu#970). Celery's ``ack_log_error``
    lets only connection errors through ("Couldn't ack"; the message is
    redelivered after the visibility timeout) and treats anything else as fatal.
    Here, and only here, the AttributeError becomes the connection error it is.
    """

    def ack(self, multiple: bool = False) -> None:
        try:
            super().ack(multiple=multiple)  # type: ignore[no-untyped-call]
        except AttributeError as e:
            raise RedisConnectionError(f"channel closed before the ack: {e}") from e

    def reject(self, requeue: bool = False) -> None:
        try:
            super().reject(requeue=requeue)  # type: ignore[no-untyped-call]
        except AttributeError as e:
            raise RedisConnectionError(f"channel closed before the reject: {e}") from e


class GuardedChannel(LeanChannel):
    """A Redis channel that turns unusable list items into quarantine envelopes.

    Built on ``LeanChannel``: what the check learns (the parsed envelope, its
    text, the decoded body) is reused by kombu instead of being computed again.
    """

    Message = GuardedMessage
    #: Characters of an unusable item kept for the dead-letter list; set from the
    #: transport option of the same name (PREDICTQ_DEAD_LETTER_MAX_BYTES).
    predictq_raw_limit: int = DEFAULT_RAW_LIMIT
    #: Body limits (PREDICTQ_MAX_PAYLOAD_BYTES, PREDICTQ_MAX_JSON_BYTES), checked on
    #: the base64 text before kombu decodes it or copies it into the unacked hash.
    predictq_max_payload_bytes: int | None = None
    predictq_max_json_bytes: int | None = None
    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "predictq_raw_limit",
        "predictq_max_payload_bytes",
        "predictq_max_json_bytes",
    )

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        if asynchronous:
            # The event loop's connections (BRPOP, and the pub/sub of events and
            # remote control) belong to kombu's poller, which watches their
            # sockets and reconnects itself on an error. redis-py's own retry
            # (3 by default) reconnects a pub/sub connection the server closed
            # (Sentinel's CLIENT KILL when it demotes a master, a Redis
            # `timeout`) behind kombu's back: kombu's disconnect hook has
            # already unregistered the old socket, nobody watches the new one,
            # and the subscriber (Flower's event receiver, a worker's remote
            # control) waits forever without an error. With no retry the error
            # reaches kombu, which reconnects and subscribes again.
            params["retry"] = Retry(NoBackoff(), 0)
        return params

    def _brpop_read(self, **options: Any) -> bool:
        # Copied from kombu 5.7 Channel._brpop_read; only the delivery differs.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if dest__item:
                dest, item = dest__item
                dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]  # type: ignore[no-untyped-call]
                self._queue_cycle.rotate(dest)
                self.deliver_popped(self._checked(item, dest), dest)
                return True
            raise Empty()
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]

    def _checked(self, item: bytes, queue: str) -> Popped:
        """The item's envelope if kombu can use it, else a quarantine envelope."""
        limit = self.predictq_raw_limit
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            text = item.decode("latin-1")
            reason = "expected a kombu message (JSON text), received bytes that are not UTF-8"
            return _refused(quarantine(text, reason, queue, raw_limit=limit, task_id=None))
        try:
            # kombu's own JSON decoder: the same objects kombu would have built
            # (around the body, which is only sliced out: predictq/kombu_layout.py).
            payload = loads_envelope(text, kombu_loads)
        except (ValueError, TypeError) as e:
            reason = f"expected a kombu message (a JSON object), received non-JSON text ({e})"
            return _refused(quarantine(text, reason, queue, raw_limit=limit, task_id=None))
        task_id = _task_id_of(payload)
        headers = payload.get("headers") if isinstance(payload, dict) else None
        if isinstance(headers, dict) and "compression" in headers:
            # kombu's Message decompresses in its constructor, before any size check.
            reason = (
                f"expected an uncompressed body, received one compressed with "
                f"{headers['compression']!r:.40}; send large inputs as they are"
            )
            return _refused(
                quarantine(text, reason, queue, raw_limit=limit, task_id=task_id, kind="compressed")
            )
        too_large = self._too_large(payload)
        if too_large is not None:
            return _refused(
                quarantine(
                    text, too_large, queue, raw_limit=limit, task_id=task_id, kind="too_large"
                )
            )
        problem, body = checked_envelope(payload)
        if problem is None:
            return Popped(payload, text, body)
        return _refused(quarantine(text, problem, queue, raw_limit=limit, task_id=task_id))

    def _too_large(self, payload: object) -> str | None:
        if not isinstance(payload, dict) or not isinstance(payload.get("body"), str):
            return None
        is_json = payload.get("content-type") == "application/json"
        limit = self.predictq_max_json_bytes if is_json else self.predictq_max_payload_bytes
        chars = len(payload["body"])
        # base64 carries 3 bytes in 4 characters.
        if limit is None or chars <= (limit + 2) // 3 * 4:
            return None
        name = "PREDICTQ_MAX_JSON_BYTES" if is_json else "PREDICTQ_MAX_PAYLOAD_BYTES"
        body: str = payload["body"]
        size = chars // 4 * 3 - len(body[-2:]) + len(body[-2:].rstrip("="))
        return f"message body: expected at most {limit} bytes ({name}), received {size} bytes"


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with ``GuardedChannel`` (``broker_transport`` of workers)."""

    Channel = GuardedChannel


class GuardedSentinelChannel(GuardedChannel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with the same check of every popped item.

    The method resolution order puts ``GuardedChannel`` (``_brpop_read``,
    ``Message``) before ``SentinelChannel`` (the pool that asks the sentinels
    for the master); both read their own transport options.
    """

    from_transport_options = tuple(  # type: ignore[assignment]
        dict.fromkeys(
            GuardedChannel.from_transport_options
            + kombu_redis.SentinelChannel.from_transport_options
        )
    )


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport with ``GuardedSentinelChannel`` (sentinel:// in workers)."""

    Channel = GuardedSentinelChannel


__all__ = [
    "REFUSAL_PROPERTY",
    "GuardedChannel",
    "GuardedSentinelChannel",
    "SentinelTransport",
    "Transport",
    "envelope_problem",
    "raw_envelope",
]

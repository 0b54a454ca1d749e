"""Large job inputs travel by reference: the bytes in a Redis key, the message small.

kombu's Redis transport stores a message as JSON with the body base64-encoded,
and the worker JSON-encodes the whole message again to record it as
unacknowledged: for a 2 MB job that is ~10 ms of CPU on the worker's single
consumer thread, plus copies of the data in Redis. Above
``PREDICTQ_INLINE_PAYLOAD_BYTES`` the producer stores the msgpack-encoded input
under ``predictq:payload:<task id>`` (binary, no base64), in the same MULTI as
the message, and the task argument becomes ``{"__payload__": "<that key>"}``.
The worker reads it in the pool thread, checks its size before reading it, and
deletes it once the job has a final outcome.
"""

from __future__ import annotations

from typing import Any, Final

import redis

from predictq import codec
from predictq.errors import InvalidInput, PayloadTooLarge
from predictq.redis_client import KEY_PREFIX

REF_KEY: Final = "__payload__"
PAYLOAD_PREFIX: Final = KEY_PREFIX + "payload:"


def payload_key(task_id: str) -> str:
    """Where the input of job ``task_id`` is stored."""
    return PAYLOAD_PREFIX + task_id


def reference(task_id: str) -> dict[str, str]:
    """The task argument that points at a stored payload."""
    return {REF_KEY: payload_key(task_id)}


def referenced_key(raw: object, task_id: str) -> str | None:
    """The payload key if ``raw`` is a reference, else None.

    A job may only reference its own payload: the worker deletes what it read,
    so a crafted reference to another job's key would read that job's input
    and make it fail.
    """
    if isinstance(raw, dict) and REF_KEY in raw:
        key = raw[REF_KEY]
        own = payload_key(task_id)
        if key != own or len(raw) != 1:
            raise InvalidInput(
                f"payload reference: expected {{{REF_KEY!r}: {own!r}}} (this job's own key), "
                f"received {str(raw)[:200]}"
            )
        return own
    return None


def fetch(client: redis.Redis, key: str, *, max_bytes: int) -> Any:
    """The decoded input stored at ``key``; refuses oversized payloads before reading them."""
    try:
        size = int(client.strlen(key))
    except redis.ResponseError as e:
        # WRONGTYPE: something other than a string sits at the job's own key.
        client.delete(key)
        raise InvalidInput(
            f"payload reference: expected a string value at {key!r}, received another Redis "
            f"type ({e}); the key was deleted"
        ) from e
    if size == 0:
        raise InvalidInput(
            f"payload reference: expected an input stored at {key!r}, found none "
            f"(it expired or was already consumed)"
        )
    if size > max_bytes:
        raise PayloadTooLarge(
            f"payload {key!r}: expected at most {max_bytes} bytes (PREDICTQ_MAX_PAYLOAD_BYTES), "
            f"received {size} bytes"
        )
    data = client.get(key)
    if not isinstance(data, bytes):
        raise InvalidInput(f"payload reference: the input at {key!r} expired while being read")
    return codec.loads(data, max_payload_bytes=max_bytes)

"""kombu's Redis transport layout, as predictq's producer writes and reads it.

The producer pushes task messages itself (producer/publisher.py) and looks for
lost ones (producer/recovery.py), so it depends on kombu's private Redis
format. Everything it relies on lives here, mirrored from kombu
``MIRRORED_KOMBU`` (kombu/transport/redis.py ``Channel``,
kombu/transport/virtual/base.py ``Channel.basic_publish``).
tests/test_kombu_layout.py compares each name, the envelope and the id reader
with what the installed kombu itself uses and writes, so an upgrade that
changes them fails CI.

The layout:

* A queue is one Redis list per priority step: the queue's name for priority
  0, ``<queue>\\x06\\x16<step>`` for the others. Publishing LPUSHes a message
  (at the head); consuming BRPOPs or RPOPs it (at the tail); restoring an
  unacknowledged message LPUSHes or RPUSHes it back. Nothing else removes an
  item, so an item's index counted from the head never decreases while it
  stays in the list.
* A message is JSON: ``body`` (base64), ``content-encoding``, ``content-type``,
  ``headers`` (Celery's task headers), then ``properties``, last: Celery's
  ``correlation_id`` (the task id) and ``reply_to``, then kombu's
  ``delivery_mode``, ``delivery_info``, ``priority``, ``body_encoding`` and
  ``delivery_tag``.
* A reserved (delivered, unacknowledged) message is a field of the hash
  ``unacked``: delivery tag -> JSON ``[message, exchange, routing_key]``, so
  the message's properties are still within a few dozen bytes of the end.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

import numpy as np
import pybase64
import redis

from predictq.carrier import JOBS_HEADER

#: The kombu release whose Redis layout this module mirrors.
MIRRORED_KOMBU: Final = "5.7"

#: ``Channel.sep``: between a queue's name and its priority step.
PRIORITY_SEP: Final = "\x06\x16"
#: ``Channel.priority_steps``: one list per step.
PRIORITY_STEPS: Final = (0, 3, 6, 9)
#: ``Channel.unacked_key``: the hash of reserved messages.
UNACKED_KEY: Final = "unacked"
#: ``Channel.body_encoding``.
BODY_ENCODING: Final = "base64"
#: kombu's ``PERSISTENT_DELIVERY_MODE`` (the default for Celery's queues).
PERSISTENT: Final = 2


def list_key(queue: str, priority_step: int = 0) -> str:
    """The Redis list holding ``queue``'s messages of one priority step (``_q_for_pri``)."""
    return f"{queue}{PRIORITY_SEP}{priority_step}" if priority_step else queue


def queue_keys(queue: str) -> list[str]:
    """The Redis lists kombu uses for ``queue``, one per priority step."""
    return [list_key(queue, step) for step in PRIORITY_STEPS]


def encode_message(
    body: bytes,
    *,
    queue: str,
    content_type: str,
    content_encoding: str,
    headers: Mapping[str, Any],
    properties: Mapping[str, Any],
    expiration_ms: int | None = None,
) -> bytes:
    """A priority-0 message for ``queue`` as kombu's Redis transport stores it.

    ``properties`` are the message's own (Celery's ``correlation_id`` and
    ``reply_to``, first); kombu's delivery properties follow, with
    ``expiration_ms`` as kombu's ``expiration`` (which the Redis transport
    stores but ignores). The message is routed like Celery's ``send_task``
    routes to an automatic queue: by the default exchange (``""``) with the
    queue's name as routing key.
    """
    expiration = {} if expiration_ms is None else {"expiration": str(expiration_ms)}
    rest = {
        "content-encoding": content_encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **properties,
            "delivery_mode": PERSISTENT,
            **expiration,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": BODY_ENCODING,
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    # kombu.utils.json.dumps is json.dumps with the default separators. The
    # body goes in as it is: base64 text needs no JSON escaping, and having the
    # JSON encoder scan it costs ~0.7 ms per 250 KB (a coalesced message of
    # images) on the publishing thread. The bytes are json.dumps's exactly.
    return b'{"body": "' + pybase64.b64encode(body) + b'", ' + json.dumps(rest).encode()[1:]


def _literal(text: str) -> bool:
    """Whether ``text`` between JSON quotes stands for itself: no escape, no control character."""
    if not text.isascii() or "\\" in text:  # isascii is O(1): CPython keeps the flag
        return False
    # str.isprintable() walks the text one character at a time (~0.7 ms per 250 KB).
    return not text or int(np.frombuffer(text.encode("ascii"), np.uint8).min()) >= 0x20


#: How every message of this layout begins (kombu's envelopes put the body first too).
_BODY_PREFIX: Final = '{"body": "'


def loads_envelope(text: str, loads: Callable[[str], Any] = json.loads) -> Any:
    """``loads(text)`` for a message in this layout, without scanning its body twice.

    A body-first message (``encode_message``'s, and kombu's own) is parsed
    around its body: base64 is ASCII with no '"', '\\' or control character,
    and for such text the body's JSON value is the text between its quotes; only the
    small rest of the envelope goes through ``loads`` (kombu's decoder in the
    worker). Any other body, text of another shape, or a rest that names a body
    again is parsed whole, so the result is always ``loads(text)``'s.
    """
    start = len(_BODY_PREFIX)
    if text.startswith(_BODY_PREFIX):
        end = text.find('"', start)
        if end > 0 and text.startswith(", ", end + 1):
            body = text[start:end]
            if _literal(body):
                rest = loads("{" + text[end + 3 :])
                if isinstance(rest, dict) and "body" not in rest:
                    return {"body": body, **rest}
    return loads(text)


# KEYS[1]: a queue list or the unacked hash. ARGV: cursor ('0' to start), count.
# Reads `count` messages (LRANGE from index `cursor`, or HSCAN from `cursor`)
# and returns {next cursor ('0' when done), bytes read, their task ids...}.
# The task id is the correlation_id property, near the end of each message
# (see the layout above): only the last 2 KB are searched. A coalesced message
# (predictq/carrier.py) also lists its jobs' ids in a header, which comes after
# the body (base64, which holds no '"'): a plain find past the body's end.
_READ_IDS = """
local key, cursor, count = KEYS[1], ARGV[1], tonumber(ARGV[2])
local kind = redis.call('TYPE', key)['ok']
local items, nxt = {}, '0'
if kind == 'list' then
  local start = tonumber(cursor)
  items = redis.call('LRANGE', key, start, start + count - 1)
  if #items == count then nxt = string.format('%d', start + count) end
elseif kind == 'hash' then
  local res = redis.call('HSCAN', key, cursor, 'COUNT', count)
  nxt = res[1]
  for j = 2, #res[2], 2 do items[#items + 1] = res[2][j] end
end
local out, bytes = {nxt, 0}, 0
for _, item in ipairs(items) do
  bytes = bytes + #item
  -- Plain finds (memchr-fast); a pattern match costs ~25 ns per byte searched.
  local _, e = string.find(item, '"correlation_id": "', math.max(1, #item - 2048), true)
  local q = e and string.find(item, '"', e + 1, true)
  if q then out[#out + 1] = string.sub(item, e + 1, q - 1) end
  local _, b = string.find(item, '"body": "', 1, true)
  local body_end = b and string.find(item, '"', b + 1, true)
  local _, j = string.find(item, '"@JOBS_HEADER@": [', body_end or 1, true)
  local k = j and string.find(item, ']', j + 1, true)
  if k then
    for id in string.gmatch(string.sub(item, j + 1, k - 1), '"([^"]*)"') do
      out[#out + 1] = id
    end
  end
end
out[2] = bytes
return out
""".replace("@JOBS_HEADER@", JOBS_HEADER)


class TaskIdReader:
    """Reads the task ids of the messages at a queue list or the unacked hash, chunk by chunk.

    Each Redis call reads about ``chunk_bytes`` of messages (the count adapts
    to the size of the last ones read), so no call blocks Redis for long
    however deep the queue.
    Calls are not atomic together: see ``ids`` for what that guarantees.
    """

    def __init__(self, client: redis.Redis, *, chunk_bytes: int = 128 * 1024) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be an integer >= 1, got {chunk_bytes!r}")
        self._script = client.register_script(_READ_IDS)
        self._chunk_bytes = chunk_bytes

    def ids(self, key: str) -> Iterator[list[str]]:
        """The task ids at ``key``, one list per Redis call, until the end.

        A list is read from the head to its current end; as items only move
        away from the head (see the layout), every message that stays in the
        list for the whole read is returned. A hash is read with HSCAN, which
        returns every field present for the whole read. Messages that arrive
        or leave meanwhile may or may not be returned; some may come twice.
        """
        cursor, count = "0", 16
        while True:
            reply = self._script(keys=[key], args=[cursor, count])
            cursor = _text(reply[0])
            read_bytes = int(reply[1])
            yield [_text(i) for i in reply[2:]]
            if cursor == "0":
                return
            if read_bytes:
                # Toward chunk_bytes per call: shrink at once, grow at most 2x.
                count = max(1, min(4096, 2 * count, count * self._chunk_bytes // read_bytes))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

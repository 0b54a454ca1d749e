"""Publish task messages straight into the Redis queue: one LPUSH per job.

Celery's ``send_task`` publishes a third as many jobs per second as this path
(bench/publish.py, 32 threads publishing one-sample jobs: 0.32-0.40x, with
Celery's shared producer pool or a kombu producer per thread alike, both one
LPUSH per job): the cost is not the pool's lock but ~1,350 Python calls per
message through Celery's and kombu's publish machinery, against ~270 here. So
this module builds the same protocol-2 message (headers, properties and body
come from Celery's own ``create_task_message``), wraps it in kombu's Redis
envelope (predictq/kombu_layout.py; tests/test_kombu_layout.py checks it field
by field against what ``send_task`` pushes) and pushes it with one redis-py
command; redis-py's connection pool gives each concurrent thread its own
connection. The worker consumes it with kombu unchanged;
tests/test_end_to_end.py runs every job through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from celery import Celery

from predictq import kombu_layout
from predictq.codec import CONTENT_TYPE, dumps


class RedisPublisher:
    """Encodes and publishes predictq task messages for one queue."""

    def __init__(self, app: Celery, client: redis.Redis, queue: str) -> None:
        self._app = app
        self._client = client
        self._queue = queue
        self._list_key = kombu_layout.list_key(queue)

    def encode(
        self,
        task_id: str,
        task_name: str,
        args: tuple[Any, ...],
        *,
        expires: datetime | None,
        headers: dict[str, Any],
        argsrepr: str,
        kwargs: dict[str, Any] | None = None,
    ) -> bytes:
        """The message as kombu's Redis transport stores it (what ``send_task`` would push).

        ``kwargs`` are small (a job's model and version): Flower shows their repr.
        """
        message = self._app.amqp.create_task_message(
            task_id,
            task_name,
            args,
            kwargs or {},
            expires=expires,
            argsrepr=argsrepr,
            kwargsrepr=repr(kwargs or {}),
            # send_task's default: the app's id for this thread.
            reply_to=self._app.thread_oid,
        )
        expiration_ms = None
        if expires is not None:
            # send_task also passes the time left to kombu, which stores it but
            # (on Redis) ignores it: the `expires` header is what workers obey.
            expiration_ms = int(max(0.0, (expires - datetime.now(UTC)).total_seconds()) * 1000)
        return kombu_layout.encode_message(
            dumps(message.body),
            queue=self._queue,
            content_type=CONTENT_TYPE,
            content_encoding="binary",
            headers={**message.headers, **headers},
            properties=message.properties,
            expiration_ms=expiration_ms,
        )

    def publish(self, raw: bytes, payloads: Sequence[tuple[str, bytes, int]] = ()) -> None:
        """Push one encoded message onto the queue (raises redis errors).

        ``payloads`` (key, bytes, ttl_s each: the inputs its jobs refer to) are
        stored in the same transaction, so the message never exists without them.
        """
        if not payloads:
            self._client.lpush(self._list_key, raw)
            return
        pipe = self._client.pipeline(transaction=True)
        for key, data, ttl_s in payloads:
            pipe.set(key, data, ex=ttl_s)
        pipe.lpush(self._list_key, raw)
        pipe.execute()

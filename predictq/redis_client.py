"""Plain redis-py clients for the side channels (readiness, delivery counts, queue length).

Celery and kombu own the job and result traffic; these clients only touch
predictq's own small keys and ``LLEN`` of the queue (whose key names are
kombu's: predictq/kombu_layout.py).
"""

from __future__ import annotations

from typing import Final

import redis

KEY_PREFIX: Final = "predictq:"


def client_from_url(url: str, *, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// with TLS query options, unix://)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        health_check_interval=10,
        retry_on_timeout=True,
    )


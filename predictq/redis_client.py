"""Plain redis-py clients for the side channels (readiness, delivery counts, queue length).

Celery and kombu own the job and result traffic; these clients only touch
predictq's own small keys and ``LLEN`` of the queue (whose key names are
kombu's: predictq/kombu_layout.py). Every one of them is made here, so that a
Sentinel URL (predictq/sentinel.py) gives all of them a client that follows
the master through a failover.
"""

from __future__ import annotations

from typing import Any, Final

import redis

from predictq import sentinel
from predictq.errors import ConfigError
from predictq.settings import Settings

KEY_PREFIX: Final = "predictq:"


def client_from_url(
    url: str,
    *,
    socket_timeout_s: float = 5.0,
    sentinel_master: str | None = None,
    sentinel_password: str | None = None,
) -> redis.Redis:
    """A client for ``url``: redis://, rediss:// with TLS query options, unix://, or sentinel://.

    A sentinel:// URL needs ``sentinel_master`` (and ``sentinel_password`` when
    the sentinels have one); its client always talks to the current master.
    """
    common: dict[str, Any] = {"health_check_interval": 10, "retry_on_timeout": True}
    if sentinel.is_sentinel_url(url):
        if not sentinel_master:
            raise ConfigError(
                "a sentinel:// URL needs the master set's name (PREDICTQ_SENTINEL_MASTER)"
            )
        return sentinel.master_client(
            url,
            master=sentinel_master,
            password=sentinel_password,
            socket_timeout_s=socket_timeout_s,
            **common,
        )
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, **common
    )


def client_for(settings: Settings, url: str, *, socket_timeout_s: float = 5.0) -> redis.Redis:
    """A client for one of ``settings``' URLs, through its Sentinel settings when it is one."""
    return client_from_url(
        url,
        socket_timeout_s=socket_timeout_s,
        sentinel_master=settings.sentinel_master,
        sentinel_password=settings.sentinel_password,
    )

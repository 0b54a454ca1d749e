"""The producer's Celery app: Celery's message building and result decoding, no result consumer.

The client publishes with its own publisher (producer/publisher.py) and
collects results with its own collector (producer/collector.py); from Celery it
needs the protocol-2 message builder and the result backend's decoder.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.backends.redis import RedisBackend, SentinelBackend

from predictq.sentinel import is_sentinel_url


class ProducerBackend(RedisBackend):  # type: ignore[misc]
    """Celery's Redis backend, minus its per-call pub/sub subscription.

    ``send_task`` calls ``backend.on_task_call``, which subscribes Celery's own
    result consumer to the task; that consumer is not shared between threads.
    The ResultCollector subscribes instead, so this hook does nothing.
    """

    def __init__(self, app: Celery, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url or app.conf.result_backend, **kwargs)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


class ProducerSentinelBackend(SentinelBackend):  # type: ignore[misc]
    """ProducerBackend for a sentinel:// result backend."""

    def __init__(self, app: Celery, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(app=app, url=url or app.conf.result_backend, **kwargs)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        return None


def producer_backend(app: Celery, url: str | None = None, **kwargs: Any) -> RedisBackend:
    """ProducerBackend, or its Sentinel twin for a sentinel:// URL."""
    url = url or app.conf.result_backend
    cls = ProducerSentinelBackend if is_sentinel_url(url) else ProducerBackend
    return cls(app, url, **kwargs)


class ProducerApp(Celery):  # type: ignore[misc]
    """The producer's Celery app: its result backend is ProducerBackend (or the Sentinel one)."""

    # Celery builds `app.backend` from `backend_cls` when set (celery/app/base.py
    # `_get_backend`), whatever the URL's scheme; passing `backend=` to the
    # constructor would only set the `result_backend` setting, which the
    # configuration then overrides. A factory: the class depends on the URL.
    backend_cls = staticmethod(producer_backend)

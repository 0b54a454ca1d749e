"""Poison-job protection: count the attempts of redelivered jobs, give up after N.

A job that kills its worker process (segfault, ``os._exit``, OOM killer) is
never acknowledged, so the broker redelivers it, and it would kill every worker
it reaches, forever. Redis does not count deliveries, so predictq does, in
``predictq:attempts:<task id>``, but only for messages kombu marks as
``redelivered`` (first deliveries pay nothing).

An attempt is counted on the device thread right before the job's device call,
and redelivered jobs run in batches of their own. So a job that was merely
queued or batched next to a poison job when the process died is not blamed: its
count grows only when it actually runs, alone, and is cleared as soon as its
device call returns (it survived, so it is not the one killing workers). The
first attempt is never counted (it was not known to be special), hence
``1 + count``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from predictq.errors import BrokerUnavailable, PoisonJob
from predictq.redis_client import KEY_PREFIX

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a count may wait for Redis (restarting) before the job is requeued.
REDIS_PATIENCE_S = 15.0


def _patiently(op: Callable[[], T]) -> T:
    """Run a Redis operation, retrying through a short outage (a Redis restart)."""
    give_up = time.monotonic() + REDIS_PATIENCE_S
    delay_s = 0.1
    while True:
        try:
            return op()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            if time.monotonic() + delay_s > give_up:
                raise BrokerUnavailable(f"cannot count the job's attempts in Redis: {e}") from e
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 1.0)


class DeliveryTracker:
    """Counts attempts of redelivered jobs in Redis and enforces ``max_deliveries``."""

    def __init__(self, client: redis.Redis, *, max_deliveries: int, ttl_s: float) -> None:
        self._client = client
        self._max = max_deliveries
        self._ttl_s = int(ttl_s)

    def _key(self, task_id: str) -> str:
        return f"{KEY_PREFIX}attempts:{task_id}"

    def _error(self, task_id: str, attempts: int) -> PoisonJob:
        return PoisonJob(
            f"job {task_id} ran {attempts} time(s) and its worker process died each time "
            f"(PREDICTQ_MAX_DELIVERIES={self._max}); it is not run again"
        )

    def check(self, task_id: str) -> None:
        """Raise PoisonJob if the job already used all its attempts (no device use)."""
        raw = _patiently(lambda: self._client.get(self._key(task_id)))
        attempts = 1 + int(raw or 0)
        if attempts >= self._max:
            raise self._error(task_id, attempts)

    def survived(self, task_id: str) -> None:
        """The job's device call returned: whatever kills workers, it is not this job."""
        _patiently(lambda: self._client.delete(self._key(task_id)))

    def count_attempt(self, task_id: str) -> None:
        """Record one more attempt; raise PoisonJob if it would exceed the limit."""

        def incr() -> list[int]:
            pipe = self._client.pipeline()
            pipe.incr(self._key(task_id))
            pipe.expire(self._key(task_id), self._ttl_s)
            return list(pipe.execute())

        count, _ = _patiently(incr)
        attempts = 1 + int(count)
        if attempts > self._max:
            raise self._error(task_id, attempts - 1)
        log.warning(
            "job %s redelivered: running it alone (attempt %d of at most %d)",
            task_id,
            attempts,
            self._max,
        )

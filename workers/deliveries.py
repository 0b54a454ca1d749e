"""Poison-job protection: count the attempts of redelivered jobs, give up after N.

A job that kills its worker process (segfault, ``os._exit``, OOM killer) is
never acknowledged, so the broker redelivers it, and it would kill every worker
it reaches, forever. Redis does not count deliveries, so predictq does, in
``predictq:attempts:<task id>``, but only for messages kombu marks as
``redelivered`` (first deliveries pay nothing).

An attempt is counted on the device thread right before the job's device call,
and redelivered jobs run in batches of their own. So a job that was merely
queued or batched next to a poison job when the process died is not blamed: its
count grows only when it actually runs, alone. The first attempt is never
counted (it was not known to be special), hence ``1 + count``.
"""

from __future__ import annotations

import logging

import redis

from predictq.errors import PoisonJob
from predictq.redis_client import KEY_PREFIX

log = logging.getLogger(__name__)


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
        raw = self._client.get(self._key(task_id))
        attempts = 1 + int(raw or 0)
        if attempts >= self._max:
            raise self._error(task_id, attempts)

    def count_attempt(self, task_id: str) -> None:
        """Record one more attempt; raise PoisonJob if it would exceed the limit."""
        pipe = self._client.pipeline()
        pipe.incr(self._key(task_id))
        pipe.expire(self._key(task_id), self._ttl_s)
        count, _ = pipe.execute()
        attempts = 1 + int(count)
        if attempts > self._max:
            raise self._error(task_id, attempts - 1)
        log.warning("job %s redelivered: running it alone (attempt %d of at most %d)",
                    task_id, attempts, self._max)

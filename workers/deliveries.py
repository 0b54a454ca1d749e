"""Poison-job protection: count the attempts of redelivered jobs, give up after N.

A job that kills its worker process (segfault, ``os._exit``, OOM killer) is
never acknowledged, so the broker redelivers it, and it would kill every worker
it reaches, forever. Redis does not count deliveries, so predictq does, in
``predictq:attempts:<task id>``, but only for messages kombu marks as
``redelivered`` (first deliveries pay nothing). The first attempt is never
counted (it was not known to be special), hence ``1 + count``.

Counting happens on the job's own thread (workers/runtime.py), never on the
device thread: these Redis writes retry through a Redis restart for up to
``REDIS_PATIENCE_S``, and on the device thread that would stall every batch of
the process. A redelivered job is counted right before it is handed to the
batcher and cleared as soon as its result is back (the process survived it, so
it is not the one killing workers). Redelivered jobs go to the batcher one at a
time per process and run in batches of their own, so when a process dies while
one is in the batcher, that one is counted, and the suspects still waiting their
turn are not.

The count may run slightly high, never low: a suspect is counted from before it
reaches the batcher until its result is back on its thread, so if a batch of
first deliveries kills the process in that window (while the suspect waits in
the batcher, or just after its own call returned), the suspect is blamed for
that death too. Were several suspects queued together, each would be blamed for
the one death; handing them over one at a time keeps the over-count to that
window. A job is thus given up after at most ``PREDICTQ_MAX_DELIVERIES`` deaths
that happened while it was running or next in line, never fewer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from predictq.errors import PoisonJob, Requeue
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
                raise Requeue(f"cannot count the job's attempts in Redis: {e}") from e
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

    def count_attempt(self, task_id: str) -> None:
        """Record one more attempt; PoisonJob if the job already used all of them."""

        def incr() -> list[int]:
            pipe = self._client.pipeline()
            pipe.incr(self._key(task_id))
            pipe.expire(self._key(task_id), self._ttl_s)
            return list(pipe.execute())

        count, _ = _patiently(incr)
        attempts = 1 + int(count)
        if attempts > self._max:
            raise PoisonJob(
                f"job {task_id} ran {attempts - 1} time(s) and its worker process died each "
                f"time (PREDICTQ_MAX_DELIVERIES={self._max}); it is not run again"
            )
        log.warning(
            "job %s redelivered: running it alone (attempt %d of at most %d)",
            task_id,
            attempts,
            self._max,
        )

    def survived(self, task_id: str) -> None:
        """The job's result is back: whatever kills workers, it is not this job."""
        _patiently(lambda: self._client.delete(self._key(task_id)))

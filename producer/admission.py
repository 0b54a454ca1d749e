"""Admission checks a job passes before it is sent: its size, and the queue's length.

Both refuse, with a typed error, a job that would be refused or pile up later:
``PayloadTooLarge`` for an input the workers would refuse, ``QueueFull`` once
``PREDICTQ_MAX_QUEUE_LENGTH`` jobs wait in the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from predictq.errors import BrokerUnavailable, PayloadTooLarge, QueueFull
from predictq.kombu_layout import queue_keys
from predictq.settings import Settings, mask_url
from producer.wire import JobInput

T = TypeVar("T")

#: How long a measured queue length is reused (plus this client's own submits since).
QUEUE_LENGTH_TTL_S = 0.05


def check_size(job_input: JobInput, settings: Settings) -> None:
    """Refuse a job that the workers would refuse, before it is sent."""
    limit = settings.max_payload_bytes
    if job_input.nbytes > limit:
        raise PayloadTooLarge(
            f"inputs: expected at most {limit} bytes per job (PREDICTQ_MAX_PAYLOAD_BYTES), "
            f"received {job_input.nbytes} bytes; use predict_many() to split it"
        )


class QueueGate:
    """The queue's length, measured at most every 50 ms, against PREDICTQ_MAX_QUEUE_LENGTH."""

    def __init__(
        self,
        broker: redis.Redis,
        settings: Settings,
        retrying: Callable[[Callable[[], int]], int],
    ) -> None:
        self._broker = broker
        self._settings = settings
        self._retrying = retrying
        # Guards the estimate: (when it was measured, jobs waiting then + this
        # client's submits since).
        self._lock = threading.Lock()
        self._estimate: tuple[float, int] = (0.0, 0)

    def length(self) -> int:
        """Jobs waiting in the queue (not yet reserved by a worker)."""
        try:
            return self._length()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BrokerUnavailable(
                f"cannot read the queue length from {mask_url(self._settings.broker_url)}: {e}"
            ) from e

    def _length(self) -> int:
        pipe = self._broker.pipeline(transaction=False)
        for key in queue_keys(self._settings.queue):
            pipe.llen(key)
        return int(sum(pipe.execute()))

    def admit(self) -> None:
        """Count one more job, or raise ``QueueFull`` if the queue is at its cap."""
        cap = self._settings.max_queue_length
        if cap is None:
            return
        # One LLEN per 50 ms at most; in between, count this client's own
        # submits on top, so a single producer never overshoots the cap (several
        # producers may, by at most their submits in that window).
        with self._lock:
            measured_at, length = self._estimate
            now = time.monotonic()
            stale = now - measured_at > QUEUE_LENGTH_TTL_S
            if stale:
                # Retried like the publish itself: submit's promise is to retry
                # an unreachable Redis until PREDICTQ_SUBMIT_TIMEOUT_S.
                length = self._retrying(self._length)
            if length >= cap:
                self._estimate = (now, length)
                raise QueueFull(
                    f"queue {self._settings.queue!r}: expected fewer than {cap} waiting jobs "
                    f"(PREDICTQ_MAX_QUEUE_LENGTH), found {length}"
                )
            self._estimate = (now if stale else measured_at, length + 1)

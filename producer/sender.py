"""Jobs into task messages: one job as ``predictq.predict``, several as ``predictq.predict_jobs``.

A job alone travels as a plain single-job message, what every producer sends;
several jobs (coalesced by producer/coalescer.py) travel as one carrier
message (predictq/carrier.py). Either way an input above
``PREDICTQ_INLINE_PAYLOAD_BYTES`` travels by reference (predictq/payloads.py),
stored in the same transaction as the message. Publishing retries an
unreachable Redis up to ``PREDICTQ_SUBMIT_TIMEOUT_S``, then raises
``BrokerUnavailable``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final, TypeVar

import redis
from kombu.exceptions import OperationalError

from predictq import carrier, codec, payloads
from predictq.celeryconf import PREDICT_JOBS_TASK, PREDICT_TASK, SENT_AT_HEADER
from predictq.errors import BrokerUnavailable
from predictq.modelref import DEFAULT_REF, ModelRef
from predictq.settings import Settings, mask_url
from producer.publisher import RedisPublisher
from producer.wire import JobInput

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_ERRORS: Final = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)
#: What an entry costs in a carrier besides its inline data: keys, id, deadline,
#: msgpack headers, or the whole reference of an input sent by reference.
ENTRY_OVERHEAD_BYTES: Final = 256


@dataclass(frozen=True)
class Outgoing:
    """A job ready to publish."""

    job_id: str
    job_input: JobInput
    expires: datetime | None
    task: str = PREDICT_TASK
    #: ``time.monotonic()`` instant after which its publish stops retrying an
    #: unreachable Redis (None: ``submit_timeout_s`` from the publish's start).
    give_up: float | None = None
    #: The model (and pinned version) the job asks for.
    ref: ModelRef = DEFAULT_REF


class Sender:
    """Encodes and publishes jobs for one client."""

    def __init__(self, publisher: RedisPublisher, settings: Settings) -> None:
        self._publisher = publisher
        self._settings = settings
        # A stored input must outlive the job's longest life: queued, then
        # redelivered up to max_deliveries times after the visibility timeout.
        self._payload_ttl_s = int(
            settings.result_ttl_s + settings.visibility_timeout_s * (settings.max_deliveries + 1)
        )

    def by_reference(self, job_input: JobInput) -> bool:
        """Whether the job's input travels by reference (stored in Redis), not inline."""
        return job_input.nbytes > self._settings.inline_payload_bytes

    def wire_bytes(self, job_input: JobInput) -> int:
        """About how many bytes the job adds to a carrier message."""
        inline = 0 if self.by_reference(job_input) else job_input.nbytes
        return inline + ENTRY_OVERHEAD_BYTES

    def publish(self, jobs: list[Outgoing]) -> None:
        """One message for ``jobs``: a plain one for a single job, else a carrier."""
        # Each job's submit keeps its own PREDICTQ_SUBMIT_TIMEOUT_S, however long
        # it queued behind an earlier publish: the message gives up with the first.
        limits = [j.give_up for j in jobs if j.give_up is not None]
        give_up = min(limits) if limits else None
        if len(jobs) == 1:
            job = jobs[0]
            self.publish_one(
                job.job_id, job.job_input, job.expires, job.task, job.ref, give_up=give_up
            )
            return
        entries = []
        stored = []
        for job in jobs:
            argument, payload = self._argument(job.job_id, job.job_input)
            entries.append(carrier.entry(job.job_id, argument, job.expires, job.ref))
            if payload is not None:
                stored.append(payload)
        raw = self._publisher.encode(
            # Outside every client's result prefix: its summary result is nobody's job.
            f"pq-carrier-{uuid.uuid4()}",
            PREDICT_JOBS_TASK,
            (entries,),
            # No message-level `expires`: Celery would drop the whole message,
            # and no job would get an answer. Deadlines are per entry.
            expires=None,
            headers={SENT_AT_HEADER: time.time(), carrier.JOBS_HEADER: [j.job_id for j in jobs]},
            argsrepr=carrier.argsrepr([j.job_input.summary for j in jobs]),
        )
        self.retrying(lambda: self._publisher.publish(raw, stored), give_up=give_up)

    def publish_one(
        self,
        job_id: str,
        job_input: JobInput,
        expires: datetime | None,
        task: str = PREDICT_TASK,
        ref: ModelRef = DEFAULT_REF,
        *,
        give_up: float | None = None,
    ) -> None:
        """A ``task`` message for one job (its model, if any, in the task's kwargs)."""
        argument, payload = self._argument(job_id, job_input)
        raw = self._publisher.encode(
            job_id,
            task,
            (argument,),
            expires=expires,
            headers={SENT_AT_HEADER: time.time()},
            argsrepr=job_input.summary,
            kwargs=ref.as_kwargs(),
        )
        stored = [] if payload is None else [payload]
        self.retrying(lambda: self._publisher.publish(raw, stored), give_up=give_up)

    def _argument(
        self, job_id: str, job_input: JobInput
    ) -> tuple[object, tuple[str, bytes, int] | None]:
        if not self.by_reference(job_input):
            return job_input.value, None
        data = codec.dumps(job_input.value)
        return payloads.reference(job_id), (payloads.payload_key(job_id), data, self._payload_ttl_s)

    def retrying(self, call: Callable[[], T], *, give_up: float | None = None) -> T:
        """``call()``, retried while Redis is unreachable, up to ``submit_timeout_s``.

        ``give_up``: a ``time.monotonic()`` instant to stop at instead (one try
        at least).
        """
        settings = self._settings
        if give_up is None:
            give_up = time.monotonic() + settings.submit_timeout_s
        delay_s = 0.05
        while True:
            try:
                return call()
            except CONNECTION_ERRORS as e:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    raise BrokerUnavailable(
                        f"could not reach the broker {mask_url(settings.broker_url)} within "
                        f"{settings.submit_timeout_s:g}s (PREDICTQ_SUBMIT_TIMEOUT_S): {e}"
                    ) from e
                log.warning("broker unavailable (%s); retrying for %.1fs more", e, remaining)
                time.sleep(min(delay_s, remaining))
                delay_s = min(delay_s * 2, 1.0)

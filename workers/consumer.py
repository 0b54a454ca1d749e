"""Celery's consumer with predictq's message guard in front of its task handler.

Every message goes through ``workers.guard.check`` before Celery's own
handler. A refused message is answered, kept and acknowledged, in that order:

1. its caller (when the message has a usable task id) gets the typed error
   (``InvalidMessage``, ``PayloadTooLarge``, ``DeadlineExceeded``...) as the job's
   result, and Flower a ``task-failed`` event;
2. a malformed message goes to the dead-letter list (``predictq.deadletters``);
3. only then is it acknowledged, so it never comes back, and a crash before
   this point leaves it in kombu's unacked index to be refused again.

The worker keeps serving in the same process whatever a message contains.
The consumer also keeps the ``predictq:consuming:<node>`` key alive while its
event loop runs (``predictq.readiness.ConsumingBeacon``): a worker that cannot
reach the broker, or reconnects in a loop, is not reported healthy.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import redis
from celery.worker.consumer import Consumer
from kombu.utils.json import dumps as kombu_dumps

from predictq.celeryconf import NOOP_TASK, PREDICT_JOBS_TASK, PREDICT_TASK
from predictq.deadletters import DeadLetters
from predictq.errors import InvalidMessage
from predictq.readiness import ConsumingBeacon
from predictq.redis_client import client_for
from workers import metrics
from workers.app import worker_settings
from workers.guard import Policy, Refusal, carried_job_ids, check, usable_task_id
from workers.results import JSON_RESULT, refusal_request, wants_json
from workers.transport import REFUSAL_PROPERTY, raw_envelope

log = logging.getLogger(__name__)

#: How often the event loop proves it is running (seconds).
TICK_S = 1.0


class PredictqConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, guarded: no message can stop, wedge or silence it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = worker_settings()
        self._policy = Policy(
            tasks=frozenset({PREDICT_TASK, PREDICT_JOBS_TASK, NOOP_TASK}),
            max_payload_bytes=settings.max_payload_bytes,
            max_json_bytes=settings.max_json_bytes,
        )
        self._broker_redis = client_for(settings, settings.broker_url)
        self._dead_letters = DeadLetters(
            self._broker_redis,
            max_entries=settings.dead_letter_max,
            max_chars=settings.dead_letter_max_bytes,
        )
        self._beacon: ConsumingBeacon | None = None
        self._beacon_ttl_s = settings.readiness_ttl_s
        # Beside the readiness records, which `predictq health` reads with it.
        self._backend_redis = client_for(settings, settings.result_backend)
        self._inner_loop: Any = self.loop  # type: ignore[has-type]
        self.loop = self._guarded_loop

    def _guarded_loop(self, *args: Any, **kwargs: Any) -> Any:
        # Runs once per broker connection, for as long as the connection lives.
        if self._beacon is None:
            self._beacon = ConsumingBeacon(
                self._backend_redis, self.hostname, self._beacon_ttl_s, TICK_S
            )
        beacon = self._beacon
        beacon.tick()
        # Registered after the connection's start: Celery cancels it when this
        # connection is dropped (Consumer._cancel_connection_timer_entries).
        entry = self.timer.call_repeatedly(TICK_S, beacon.tick)
        try:
            return self._inner_loop(*args, **kwargs)
        finally:
            entry.cancel()
            beacon.lost()

    def shutdown(self) -> None:
        super().shutdown()
        if self._beacon is not None:
            self._beacon.close()
            self._beacon = None
        self._broker_redis.close()
        self._backend_redis.close()

    def on_connection_error_after_connected(self, exc: BaseException) -> None:
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            # kombu 5.7 (Redis transport): `connection.collect()` drops the
            # transport's client, then `connection.close()` closes the default
            # channel, which tries to restore the unacknowledged messages
            # through that client and raises AttributeError ('NoneType' object
            # has no attribute 'hostname'). Celery calls that unrecoverable and
            # the worker exits when Redis restarts. The messages are still in
            # Redis's unacked index and the visibility timeout redelivers them,
            # so carry on reconnecting. Acks on such a channel are handled in
            # workers/transport.py (GuardedMessage). Upstream: the same restore
            # through a vanished client, celery/kombu#970; a worker that stops
            # consuming after a broker connection reset, celery/celery#10205.
            log.warning(
                "broker connection lost with unacknowledged messages; they are "
                "redelivered after PREDICTQ_VISIBILITY_TIMEOUT_S",
                exc_info=True,
            )

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Any:
        handle = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> None:
            try:
                check(message, self._policy)
                # Set here, whatever the sender wrote: the result's encoding
                # follows the message's (workers/results.py).
                message.headers[JSON_RESULT] = wants_json(message.content_type)
                handle(message)
            except Refusal as refusal:
                self._refuse(message, refusal)
            except self.connection_errors:
                raise
            except Exception as e:
                # A case the guard did not foresee, in the guard or in Celery's
                # handler: refuse the message rather than let the exception end
                # the consumer (and the message come back to end the next one).
                log.exception("a message failed the worker's message handling")
                self._refuse(
                    message,
                    Refusal(
                        "unexpected",
                        InvalidMessage(
                            f"message refused: the worker could not read it "
                            f"({type(e).__name__}: {str(e)[:200]})"
                        ),
                        task_id=usable_task_id(message.headers),
                    ),
                )

        return on_task_received

    def _refuse(self, message: Any, refusal: Refusal) -> None:
        metrics.REFUSED_MESSAGES.labels(reason=refusal.reason).inc()
        log.warning("refused a message (%s): %s", refusal.reason, refusal.error)
        if refusal.task_id is not None:
            self._answer(refusal.task_id, refusal.error, message.content_type)
        # The callers of a refused coalesced message wait on its jobs' ids.
        for job_id in carried_job_ids(message.headers):
            if job_id != refusal.task_id:
                self._answer(job_id, refusal.error, message.content_type)
        if refusal.dead_letter:
            try:
                self._dead_letter(message, refusal)
            except redis.RedisError:
                # Not kept, so not acknowledged: it stays in the unacked index
                # and is redelivered (and refused again) after the visibility
                # timeout.
                log.exception("could not dead-letter a refused message; leaving it unacked")
                return
        message.ack_log_error(log, self.connection_errors)

    def _answer(self, task_id: str, error: Exception, content_type: object) -> None:
        metrics.JOBS.labels(outcome="failure", error_type=type(error).__name__).inc()
        try:
            self.app.backend.mark_as_failure(task_id, error, request=refusal_request(content_type))
        except Exception:
            log.exception("could not store the failure of refused message %s", task_id)
            return
        if self.event_dispatcher is not None:
            self.event_dispatcher.send(
                "task-failed",
                uuid=task_id,
                exception=f"{type(error).__name__}({error})",
            )

    def _dead_letter(self, message: Any, refusal: Refusal) -> None:
        properties = message.properties or {}
        quarantined = properties.get(REFUSAL_PROPERTY)
        info = message.delivery_info or {}
        queue = str(info.get("routing_key") or worker_settings().queue)
        if isinstance(quarantined, dict):
            text = str(quarantined.get("raw", ""))
            size = int(quarantined.get("raw_chars", len(text)))
            truncated = size > len(text)
        else:
            text, size, truncated = self._envelope_text(message)
        self._dead_letters.add(
            message=text,
            reason=refusal.reason,
            detail=str(refusal.error),
            task_id=refusal.task_id,
            queue=queue,
            worker=f"{self.hostname} ({socket.gethostname()})",
            truncated=truncated,
            size_chars=size,
        )
        metrics.DEAD_LETTERS.inc()

    def _envelope_text(self, message: Any) -> tuple[str, int, bool]:
        """The message as it was in the queue: (JSON text, its length, truncated?)."""
        envelope = raw_envelope(message)
        if envelope is None:
            return "", 0, True
        limit = worker_settings().dead_letter_max_bytes
        body = envelope.get("body")
        if isinstance(body, str) and len(body) > limit:
            # Not worth serialising a body that is cut anyway (up to 256 MB).
            cut: str = kombu_dumps({**envelope, "body": body[:limit]})  # type: ignore[no-untyped-call]
            return cut, len(cut) + len(body) - limit, True
        text: str = kombu_dumps(envelope)  # type: ignore[no-untyped-call]
        return text, len(text), False

"""A Celery consumer that answers unreadable messages with a typed failure.

Celery drops a message it cannot decode (corrupted body, over-size payload)
or will not decode (pickle or another content type outside ``accept_content``)
with a log line only: the producer waiting for that job would wait until its
timeout. predictq stores a failure result for the message's task id instead, so
the caller gets ``InvalidInput``/``InvalidMessage`` at once, with a message
naming what was expected and what arrived. The body is never executed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

from predictq.codec import ACCEPT_CONTENT
from predictq.errors import InvalidMessage, PredictqError
from workers import metrics

log = logging.getLogger(__name__)


def _underlying(exc: BaseException) -> BaseException:
    """kombu wraps decoder errors in DecodeError(original); unwrap ours."""
    if isinstance(exc, DecodeError):
        inner = exc.args[0] if exc.args else None
        if isinstance(inner, BaseException):
            return inner
        if exc.__context__ is not None:
            return exc.__context__
    return exc


def message_error(message: Any, exc: BaseException) -> PredictqError:
    """The typed error a caller gets for a message that was refused."""
    inner = _underlying(exc)
    if isinstance(inner, PredictqError):
        return inner
    content_type = getattr(message, "content_type", None)
    if isinstance(exc, ContentDisallowed):
        return InvalidMessage(
            f"message refused: expected content type {' or '.join(ACCEPT_CONTENT)}, "
            f"received {content_type!r} (pickle is never accepted); the job was not run"
        )
    return InvalidMessage(
        f"message refused: expected a valid {content_type!r} body and task headers, "
        f"received one that fails with {type(inner).__name__}: {inner}"
    )


class PredictqConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, plus a stored failure result for refused messages."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # kombu 5.7 (Redis transport): after a reconnect, a job that finishes
        # acknowledges through its message's old channel, whose transport lost
        # its client, and kombu raises AttributeError ('NoneType' object has no
        # attribute 'hostname') instead of a connection error. Celery lets only
        # connection errors through `ack_log_error` ("Couldn't ack", the message
        # is redelivered after the visibility timeout) and treats anything else
        # as unrecoverable: the worker would exit whenever Redis restarts under
        # load. Counting AttributeError as a connection error makes both the ack
        # and the consumer's restart loop take the recoverable path.
        known: tuple[type[BaseException], ...] = tuple(self.conninfo.connection_errors)
        self.connection_errors = (*known, AttributeError)

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
            # so carry on reconnecting.
            log.warning(
                "broker connection lost with unacknowledged messages; they are "
                "redelivered after PREDICTQ_VISIBILITY_TIMEOUT_S",
                exc_info=True,
            )

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        super().on_decode_error(message, exc)
        self._store_failure(message, exc, "undecodable")

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        super().on_invalid_task(body, message, exc)
        self._store_failure(message, exc, "invalid")

    def _store_failure(self, message: Any, exc: BaseException, reason: str) -> None:
        metrics.REJECTED_MESSAGES.labels(reason=reason).inc()
        headers = getattr(message, "headers", None) or {}
        task_id = headers.get("id") if isinstance(headers, dict) else None
        if not isinstance(task_id, str) or not task_id:
            return  # nobody can be waiting for a message without a task id
        error = message_error(message, exc)
        metrics.JOBS.labels(outcome="failure", error_type=type(error).__name__).inc()
        try:
            self.app.backend.mark_as_failure(task_id, error)
        except Exception:
            log.exception("could not store the failure of refused message %s", task_id)
            return
        if self.event_dispatcher is not None:
            self.event_dispatcher.send(
                "task-failed", uuid=task_id, exception=f"{type(error).__name__}({error})"
            )

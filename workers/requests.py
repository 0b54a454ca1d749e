"""The worker's requests: payloads decoded once, and the model version in Flower.

``DecodedPayloadRequest`` (both predictq tasks) hands the payload the guard
decoded to the task's thread instead of the raw body. ``PredictRequest`` adds
which model version computed a job, for Flower:

Flower displays a fixed set of task fields, filled from Celery's events, and no
field of a stored result but ``result`` itself, which it takes from the
``task-succeeded`` event (a repr of the return value). Which version computes a
job is decided when the job runs (the newest loaded, unless the job pins one),
so the task records it by task id (``record_served``) and ``PredictRequest``
writes it in front of that repr: ``[model 'a' version 2] array([[...]])``.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.worker.request import Request

# Task id -> "model 'a' version 2", from the task's thread to its request's
# events. Invariant: an entry lives from the task's success until its request
# sends its outcome event (succeeded, or failed if storing the result failed),
# which removes it; so the map holds at most the jobs running at once.
_served: dict[str, str] = {}
_lock = threading.Lock()


def record_served(task_id: str, model: str, version: int) -> None:
    """Note which model version computed ``task_id``'s result (for its succeeded event)."""
    with _lock:
        _served[task_id] = f"model {model!r} version {version}"


class DecodedPayloadRequest(Request):  # type: ignore[misc]
    """Celery's request, carrying its message's decoded payload to the pool.

    Celery's pool decodes a message's body again in the thread that runs the
    task (``trace_task_ret``/``fast_trace_task``, written for prefork children,
    which receive the raw bytes), so a coalesced message of 15 images was
    decoded twice, once on the consumer's thread and once on the task's. Every
    message reaching a request has been decoded by the guard (workers/guard.py;
    kombu caches the result on the message), and Celery's own strategy hands
    such payloads over the same way (``decoded=True``) for the messages it
    converts itself.
    """

    def __init__(
        self, message: Any, *args: Any, body: Any = None, decoded: bool = False, **kwargs: Any
    ) -> None:
        if not decoded and (body is None or body is message.body):
            body, decoded = message.payload, True
        super().__init__(message, *args, body=body, decoded=decoded, **kwargs)


class PredictRequest(DecodedPayloadRequest):
    """A prediction's request, whose ``task-succeeded`` result names the model version."""

    def send_event(self, type: str, **fields: Any) -> None:
        if type in ("task-succeeded", "task-failed"):
            with _lock:
                served = _served.pop(self.id, None)
            if served is not None and type == "task-succeeded":
                fields["result"] = f"[{served}] {fields.get('result', '')}"
        super().send_event(type, **fields)

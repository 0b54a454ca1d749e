"""The worker's requests hand the payload the guard decoded to the task's thread.

Celery's pool would otherwise decode every message's body a second time there
(``fast_trace_task``/``trace_task_ret``), a coalesced message's 15 images
included. Checked at Celery's own boundary: the request class Celery builds for
a task (``create_request_cls``), the arguments it gives the pool.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from celery.worker.request import create_request_cls
from kombu.message import Message
from kombu.utils.imports import symbol_by_name

from predictq import codec
from predictq.celeryconf import PREDICT_JOBS_TASK, PREDICT_TASK
from workers.app import app
from workers.tasks import noop, predict, predict_jobs


class Pool:
    """Records what a request hands the pool."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def apply_async(self, target: Any, args: tuple[Any, ...], **_: Any) -> None:
        self.calls.append(args)


def message(task: str, args: list[Any]) -> Message:
    codec.register_serializer()
    body = codec.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None}])
    return Message(
        body=body,
        content_type=codec.CONTENT_TYPE,
        content_encoding="binary",
        headers={"id": str(uuid.uuid4()), "task": task, "lang": "py"},
        delivery_info={"exchange": "", "routing_key": "q"},
    )


def handed_to_pool(task: Any, msg: Message) -> tuple[Any, ...]:
    pool = Pool()
    # As Celery's strategy builds it (celery/worker/strategy.py).
    request_cls = create_request_cls(symbol_by_name(task.Request), task, pool, "h", None, app=app)
    request = request_cls(msg, app=app, task=task, body=msg.body, headers=msg.headers)
    request.execute_using_pool(pool)
    (args,) = pool.calls
    return args


@pytest.mark.parametrize("task", [predict, predict_jobs], ids=[PREDICT_TASK, PREDICT_JOBS_TASK])
def test_a_predictq_task_gets_the_decoded_payload_not_the_body_again(task: Any) -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    msg = message(task.name, [array] if task is predict else [[{"id": "j", "inputs": array}]])
    decoded = msg.decode()  # as the guard does, before Celery's handler
    _name, _id, _request, body, content_type, content_encoding = handed_to_pool(task, msg)
    assert content_type is None and content_encoding is None, "the pool would decode it again"
    assert body is decoded
    sent = body[0][0] if task is predict else body[0][0][0]["inputs"]
    np.testing.assert_array_equal(sent, array)


def test_a_plain_celery_task_still_gets_the_raw_body() -> None:
    # The no-op (the benchmark's per-message ceiling) stays Celery's own path.
    msg = message(noop.name, [])
    msg.decode()
    _name, _id, _request, body, content_type, _encoding = handed_to_pool(noop, msg)
    assert content_type == codec.CONTENT_TYPE and body is msg.body

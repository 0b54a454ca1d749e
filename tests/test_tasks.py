"""The predict task's argument handling, against the shared real threads-pool worker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from celery import Celery

from predictq import codec, payloads
from predictq.errors import InvalidInput
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.processes import wait_for

F = models.FEATURES


@pytest.fixture()
def plain(redis_server: RedisServer) -> Iterator[Celery]:
    """A bare Celery app, to send what a non-Python producer might."""
    app = Celery("plain", broker=redis_server.url(0), set_as_current=False)
    yield app
    app.close()


def send_by_keyword_reference(app: Celery, redis_server: RedisServer, x: np.ndarray) -> str:
    """Store ``x`` as a payload and send a job that names it as ``inputs=``."""
    task_id = str(uuid.uuid4())
    redis_server.client().set(payloads.payload_key(task_id), codec.dumps(x))
    app.send_task(
        "predictq.predict",
        kwargs={"inputs": payloads.reference(task_id)},
        task_id=task_id,
        queue="mlp",
        serializer="json",
    )
    return task_id


def test_a_stored_input_passed_as_the_inputs_keyword_is_deleted_once_its_job_ends(
    plain: Celery, redis_server: RedisServer, client: PredictionClient, mlp_path: str
) -> None:
    x = np.random.default_rng(11).random((3, F), dtype=np.float32)
    served = send_by_keyword_reference(plain, redis_server, x)
    refused = send_by_keyword_reference(plain, redis_server, np.zeros((3, F + 1), np.float32))
    assert np.allclose(client.job(served).get(timeout=60), models.reference(mlp_path, x), atol=1e-5)
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 16\], received \[3, 17\]"):
        client.job(refused).get(timeout=60)
    # Both are final outcomes: neither input is needed again. (The task deletes
    # it right after storing the result, so the result may arrive first.)
    r = redis_server.client()
    for task_id in (served, refused):
        key = payloads.payload_key(task_id)
        wait_for(lambda key=key: r.exists(key) == 0, 10, f"{key} to be deleted")

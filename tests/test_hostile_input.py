"""Hostile and broken input: each case fails alone with a typed error, the worker keeps serving.

Most cases bypass the producer's own checks and put crafted messages on the
queue, the way a buggy or malicious client in any language could.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from predictq.codec import CONTENT_TYPE
from predictq.errors import InvalidInput, InvalidMessage, PayloadTooLarge, PredictqError
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess, wait_for

F = models.FEATURES
VALID = np.full((2, F), 0.5, np.float32)


def _nd(dtype: str, shape: list[int], data: bytes) -> dict[str, Any]:
    return {"__ndarray__": 1, "dtype": dtype, "shape": shape, "data": data}


# Encodings a hostile client might use: our content type with raw msgpack (crafted
# maps), our content type with garbage, JSON, and a content type we refuse. The test
# encodes each body itself and publishes it as is: kombu's serializer registry is
# process-wide (the producer decodes results with it), so the tests leave it alone.
Encoder = Callable[[Any], bytes]
ENCODINGS: dict[str, tuple[str, str, Encoder]] = {
    "raw-msgpack": (CONTENT_TYPE, "binary", lambda v: msgpack.packb(v, use_bin_type=True)),
    "corrupt-msgpack": (CONTENT_TYPE, "binary", lambda v: b"\x93\xc1\xc1 not msgpack"),
    "json": ("application/json", "utf-8", lambda v: json.dumps(v).encode()),
    "unknown-type": ("application/x-something-else", "utf-8", lambda v: json.dumps(v).encode()),
}


@dataclass(frozen=True)
class Case:
    """One hostile job: how it is sent, and the error it must end with."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    serializer: str = "raw-msgpack"
    error: type[PredictqError] = InvalidInput
    match: str = ""
    headers: dict[str, Any] | None = None


CASES: dict[str, Case] = {
    "wrong rank": Case(
        (_nd("<f4", [F], b"\0" * 4 * F),),
        match=r"expected rank 2 with shape \[N, 16\], received rank 1",
    ),
    "wrong feature shape": Case(
        (_nd("<f4", [2, F + 3], b"\0" * 4 * 2 * (F + 3)),),
        match=r"expected shape \[N, 16\], received \[2, 19\]",
    ),
    "wrong dtype (datetime)": Case(
        (_nd("<M8[s]", [1, F], b"\0" * 8 * F),),
        match="expected a numeric dtype .* received dtype '<M8",
    ),
    "object array": Case(
        (_nd("|O", [1, F], b"\0" * 8 * F),),
        match="expected a numeric dtype .* received dtype '\\|O'",
    ),
    "string array": Case((_nd("<U4", [1, F], b"\0" * 16 * F),), match="received dtype '<U4'"),
    "strings in json lists": Case(
        ([["a"] * F],), serializer="json", match="expected a numeric dtype"
    ),
    "complex numbers": Case((_nd("<c8", [1, F], b"\0" * 8 * F),), match="received dtype '<c8'"),
    "nan": Case(
        ([[float("nan")] + [0.0] * (F - 1)],),
        serializer="json",
        match="expected finite values, received 1 NaN/Inf",
    ),
    "inf": Case(
        (_nd("<f4", [1, F], np.full((1, F), np.inf, np.float32).tobytes()),),
        match=f"received {F} NaN/Inf",
    ),
    "empty batch": Case((_nd("<f4", [0, F], b""),), match="received an empty batch"),
    "ragged lists": Case(
        ([[0.0] * F, [0.0] * (F - 1)],), serializer="json", match="ragged nested list"
    ),
    "bytes shorter than shape x dtype": Case(
        (_nd("<f4", [2, F], b"\0" * (8 * F - 1)),),
        match=r"shape \[2, 16\] of dtype <f4 needs 128 bytes, received 127",
    ),
    "bytes longer than shape x dtype": Case(
        (_nd("<f4", [1, F], b"\0" * 4 * (F + 1)),), match="needs 64 bytes, received 68"
    ),
    "negative dimension": Case(
        (_nd("<f4", [-1, F], b""),), match="expected 'shape' as a list of non-negative integers"
    ),
    "unknown dtype string": Case(
        (_nd("float-ish", [1, F], b""),), match="expected a numpy dtype string"
    ),
    "array map without data": Case(
        ({"__ndarray__": 1, "dtype": "<f4", "shape": [1]},),
        match="expected keys 'dtype', 'shape' and 'data'",
    ),
    "invalid base64 in json": Case(
        ({"__ndarray__": 1, "dtype": "<f4", "shape": [1, F], "data": "%%%"},),
        serializer="json",
        match="not valid base64",
    ),
    "scalar instead of array": Case(
        (3.5,), serializer="json", match=r"expected an array .* received float"
    ),
    "text instead of array": Case(
        ("rm -rf /",), serializer="json", match=r"expected an array .* received str"
    ),
    "dict with the wrong input name": Case(
        ({"pixels": [[0.0] * F]},), serializer="json", match=r"expected keys \['x'\], received keys"
    ),
    "corrupted msgpack": Case(
        (VALID,), serializer="corrupt-msgpack", error=InvalidInput, match="do not decode"
    ),
    "unknown content type": Case(
        (VALID.tolist(),),
        serializer="unknown-type",
        error=InvalidMessage,
        match="expected content type .* received 'application/x-something-else'",
    ),
    "payload over the size limit": Case(
        (_nd("<f4", [20_000, F], b"\0" * 4 * 20_000 * F),),
        error=PayloadTooLarge,
        match=r"expected at most 1048576 bytes .* received 128\d{4} bytes",
    ),
    "batch over the sample limit": Case(
        (_nd("<f4", [5001, F], b"\0" * 4 * 5001 * F),),
        match="expected at most 5000 samples per job",
    ),
    "payload reference outside predictq's keys": Case(
        ({"__payload__": "predictq:ready:some-worker"},),
        serializer="json",
        match="payload reference: expected",
    ),
    "payload reference to nothing": Case(
        ({"__payload__": "predictq:payload:{task_id}"},),
        serializer="json",
        match="expected an input stored at 'predictq:payload:.*', found none",
    ),
    "payload reference to another job's input": Case(
        ({"__payload__": "predictq:payload:another-job"},),
        serializer="json",
        match="expected .*this job's own key.*received .*another-job",
    ),
    "JSON body over the size limit": Case(
        ([[0.25] * F] * 60_000,),
        serializer="json",
        error=PayloadTooLarge,
        match=r"expected at most 4194304 bytes \(PREDICTQ_MAX_JSON_BYTES\), received \d{7} bytes",
    ),
    "missing task argument": Case(
        (), match="expected exactly one argument `inputs`, received 0 positional"
    ),
    "extra task argument": Case(
        (VALID.tolist(), VALID.tolist()), serializer="json", match="received 2 positional argument"
    ),
    "unknown keyword argument": Case(
        (VALID.tolist(),),
        {"temperature": 2},
        serializer="json",
        match=r"keyword arguments \['temperature'\]",
    ),
    "model name that is not a name": Case(
        (VALID.tolist(),),
        {"model": "../etc"},
        serializer="json",
        match=r"expected 'model' as a model name .*received '\.\./etc'",
    ),
    "model version that is not a positive integer": Case(
        (VALID.tolist(),),
        {"version": 0},
        serializer="json",
        match=r"expected 'version' as a positive integer, received 0",
    ),
    "model version true": Case(
        (VALID.tolist(),),
        {"version": True},
        serializer="json",
        match=r"expected 'version' as a positive integer, received True",
    ),
    "absurd expiry header": Case(
        (VALID.tolist(),),
        serializer="json",
        error=InvalidMessage,
        headers={"expires": "the twelfth of never"},
        match="message refused",
    ),
}


def publish_raw(app: Celery, case: Case, task_id: str | None = None) -> str:
    """Publish a protocol-2 task message, headers and body as crafted by ``case``."""
    task_id = task_id or str(uuid.uuid4())
    args = case.args
    if case.serializer == "json":
        # A case may name its own payload key, which depends on the task id.
        args = json.loads(json.dumps(args).replace("{task_id}", task_id))
    headers, properties, body, sent_event = app.amqp.create_task_message(
        task_id, "predictq.predict", args, case.kwargs or {}
    )
    headers.update(case.headers or {})
    content_type, content_encoding, encode = ENCODINGS[case.serializer]
    with app.producer_or_acquire() as producer:
        # With a content type given, kombu sends the bytes as they are.
        app.amqp.send_task_message(
            producer,
            "predictq.predict",
            (headers, properties, encode(body), sent_event),
            queue="mlp",
            content_type=content_type,
            content_encoding=content_encoding,
        )
    return task_id


@pytest.fixture()
def hostile(redis_server: RedisServer) -> Iterator[Celery]:
    app = Celery("hostile", broker=redis_server.url(0), set_as_current=False)
    yield app
    app.close()


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_job_fails_alone_with_a_typed_error_and_the_worker_keeps_serving(
    name: str, hostile: Celery, client: PredictionClient, mlp_path: str
) -> None:
    case = CASES[name]
    task_id = publish_raw(hostile, case)
    with pytest.raises(case.error, match=case.match):
        client.job(task_id).get(timeout=60)
    out = client.predict(VALID, timeout=60)
    assert np.allclose(out, models.reference(mlp_path, VALID), atol=1e-5)


ProducerCall = Callable[[PredictionClient], Any]
PRODUCER_CASES: dict[str, tuple[ProducerCall, str]] = {
    "negative timeout": (lambda c: c.predict(VALID, timeout=-1), r"timeout: expected seconds"),
    "absurd timeout": (lambda c: c.predict(VALID, timeout=1e12), r"received 1000000000000"),
    "nan timeout": (lambda c: c.predict(VALID, timeout=float("nan")), "received nan"),
    "negative deadline": (lambda c: c.submit(VALID, deadline_s=-5), r"deadline_s: expected"),
    "object array": (lambda c: c.submit(np.array([[object()] * F])), "expected a numeric dtype"),
    "ragged input": (lambda c: c.submit([[1.0, 2.0], [3.0]]), "ragged"),
    "oversized job": (
        lambda c: c.submit(np.zeros((20_000, F), np.float32)),
        "expected at most 1048576 bytes",
    ),
    "bad chunk size": (lambda c: c.predict_many(VALID, chunk_size=0), "chunk_size: expected"),
}


@pytest.mark.parametrize("name", list(PRODUCER_CASES))
def test_the_producer_refuses_bad_calls_before_sending_anything(
    name: str, redis_server: RedisServer, client: PredictionClient
) -> None:
    call, match = PRODUCER_CASES[name]
    # A queue no worker reads: anything sent would still be there.
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue=f"unread-{uuid.uuid4()}",
        max_payload_bytes=1024 * 1024,
    ) as unread:
        with pytest.raises(InvalidInput, match=match):
            call(unread)
        assert unread.queue_length() == 0
    assert client.predict(VALID, timeout=60).shape == (2, 4)


def _invalid_input_failures(worker: WorkerProcess) -> float:
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        families = text_string_to_metric_families(r.read().decode())
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == "predictq_jobs_total" and s.labels.get("error_type") == "InvalidInput"
    )


def test_invalid_input_runs_once_and_is_never_retried(
    client: PredictionClient, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    before = _invalid_input_failures(mlp_worker)
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 16\], received \[2, 17\]"):
        client.predict(np.zeros((2, F + 1), np.float32), timeout=60)
    # Later jobs, served after it: a retry would have run it again by now.
    for _ in range(3):
        assert np.allclose(
            client.predict(VALID, timeout=60), models.reference(mlp_path, VALID), atol=1e-5
        )
    # Counted once its failure is stored (on_failure): the result can come first.
    wait_for(lambda: _invalid_input_failures(mlp_worker) > before, 10, "the failure to be counted")
    assert _invalid_input_failures(mlp_worker) - before == 1


def test_a_job_cannot_read_or_consume_another_jobs_stored_input(
    hostile: Celery, redis_server: RedisServer, client: PredictionClient
) -> None:
    victim = f"predictq:payload:{uuid.uuid4()}"
    redis_server.client().set(victim, b"the victim's input")
    task_id = publish_raw(hostile, Case(({"__payload__": victim},), serializer="json"))
    with pytest.raises(InvalidInput, match="this job's own key"):
        client.job(task_id).get(timeout=60)
    assert redis_server.client().get(victim) == b"the victim's input"


def test_an_oversized_referenced_payload_is_refused_before_it_is_read(
    hostile: Celery, redis_server: RedisServer, client: PredictionClient
) -> None:
    task_id = str(uuid.uuid4())
    key = f"predictq:payload:{task_id}"
    redis_server.client().set(key, b"\0" * (2 * 1024 * 1024))
    publish_raw(hostile, Case(({"__payload__": key},), serializer="json"), task_id)
    with pytest.raises(PayloadTooLarge, match=r"expected at most 1048576 bytes .* 2097152 bytes"):
        client.job(task_id).get(timeout=60)
    assert client.predict(VALID, timeout=60).shape == (2, 4)

"""Any Celery client reads its results: JSON for JSON jobs, msgpack for msgpack jobs.

Real clients against a real worker: the README's two examples (Celery's default
Python client, and celery-node installed from npm) run as they are written, with
only the Redis address changed; the stored records are read back raw.
"""

from __future__ import annotations

import ast
import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import redis
from celery import Celery

from predictq.codec import RESULT_CONTENT_TYPE, RESULT_SERIALIZER, register_serializer
from predictq.errors import InvalidInput, PredictionError
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.node import celery_node
from tests.support.processes import ROOT, WorkerProcess, base_env

FEATURES, CLASSES = 64, 10  # the README examples' model
README = (ROOT / "README.md").read_text()
PREDICT = "predictq.predict"
WRONG_SHAPE = "InvalidInput input 'x': expected shape [N, 64], received [1, 63]"


@pytest.fixture(scope="module")
def model_path(model_dir: Path) -> str:
    return models.build_mlp(str(model_dir / "mlp64.keras"), features=FEATURES, classes=CLASSES)


@pytest.fixture(scope="module")
def worker(server: RedisServer, model_path: str) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(
        broker_url=server.url(0),
        result_backend=server.url(1),
        model_path=model_path,
        concurrency=4,
        name="clients",
    ).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def close_client(app: Celery) -> None:
    """Close a Celery client's broker and result connections (while its Redis still runs)."""
    if app.conf.result_backend:
        app.backend.result_consumer.stop()
        app.backend.client.connection_pool.disconnect()
    app.close()


@pytest.fixture()
def plain(server: RedisServer, worker: WorkerProcess) -> Iterator[Celery]:
    """A Python Celery client with Celery's default settings."""
    app = Celery("plain", broker=server.url(0), backend=server.url(1), set_as_current=False)
    yield app
    close_client(app)


@pytest.fixture()
def sender(server: RedisServer, worker: WorkerProcess) -> Iterator[Celery]:
    """A Celery client with default settings and no result backend: it only sends."""
    app = Celery("sender", broker=server.url(0), set_as_current=False)
    yield app
    close_client(app)


def reference(model_path: str, x: Any) -> np.ndarray[Any, Any]:
    return np.asarray(models.reference(model_path, np.asarray(x, np.float32)))


def stored(server: RedisServer, task_id: str) -> bytes:
    """The raw result record of ``task_id`` in the result backend."""
    raw = redis.Redis.from_url(server.url(1)).get(f"celery-task-meta-{task_id}")
    assert isinstance(raw, bytes), task_id
    return raw


def readme_example(name: str, server: RedisServer) -> str:
    """The README's fenced block after ``<!-- example: name``, aimed at ``server``."""
    after = README.split(f"<!-- example: {name} ", 1)[1]
    code = after.split("```", 2)[1].split("\n", 1)[1]
    assert code.count("redis://localhost:6379/") == 2, code
    return code.replace("redis://localhost:6379/", f"redis://127.0.0.1:{server.port}/")


def ndarray_map(x: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "__ndarray__": 1,
        "dtype": x.dtype.str,
        "shape": list(x.shape),
        "data": base64.b64encode(x.tobytes()).decode(),
    }


# --- the README's examples -------------------------------------------------------------------


def test_the_readme_python_example_reads_lists_and_a_typed_failure_with_celery_defaults(
    server: RedisServer, worker: WorkerProcess, model_path: str, tmp_path: Path
) -> None:
    script = tmp_path / "client.py"
    script.write_text(readme_example("celery-python", server))
    # Isolated (-I) and outside the repository: predictq is not imported there, so
    # the failure is rebuilt by Celery alone, as in any other program.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREDICTQ_", "PYTHON"))}
    out = subprocess.run(
        [sys.executable, "-I", str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr  # no warning or shutdown noise either
    rows, failure = out.stdout.splitlines()
    expected = reference(model_path, [[0.1] * FEATURES])
    assert np.allclose(ast.literal_eval(rows), expected, atol=1e-6)
    assert failure == WRONG_SHAPE


def test_the_readme_node_example_reads_lists_an_ndarray_map_and_a_failure_with_celery_node(
    server: RedisServer, worker: WorkerProcess, model_path: str, tmp_path: Path
) -> None:
    node_modules = celery_node()
    script = tmp_path / "client.js"
    script.write_text(readme_example("celery-node", server))
    out = subprocess.run(
        ["node", str(script)],
        cwd=tmp_path,
        env={**base_env(), "NODE_PATH": str(node_modules)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    rows, array, failure = out.stdout.splitlines()
    assert np.allclose(json.loads(rows), reference(model_path, [[0.1] * FEATURES]), atol=1e-6)
    dtype, shape, values = array.split(" ", 2)
    assert (dtype, json.loads(shape)) == ("<f4", [2, CLASSES])
    expected = reference(model_path, np.full((2, FEATURES), 0.1, np.float32))
    # Raw float32 bytes both ways, no decimal text in between: every number that arrives is
    # exactly a float32 value (rounded decimal text almost never is). The values themselves are
    # compared with a tolerance: the worker may batch this job with the others, and a different
    # batch shape changes the matmul's summation order in the last bit.
    received = np.asarray(json.loads(values), np.float64)
    assert np.array_equal(received, received.astype(np.float32).astype(np.float64))
    assert np.allclose(received, expected.ravel(), atol=1e-6)
    assert failure == WRONG_SHAPE


# --- what is stored --------------------------------------------------------------------------


def test_a_json_job_gets_a_json_record_in_the_form_it_sent_and_no_traceback(
    plain: Celery, server: RedisServer, model_path: str
) -> None:
    x = np.random.default_rng(1).random((3, FEATURES), dtype=np.float32)
    lists = plain.send_task(PREDICT, args=[x.tolist()], queue="predictq")
    maps = plain.send_task(PREDICT, args=[ndarray_map(x)], queue="predictq")
    bad = plain.send_task(PREDICT, args=[[[0.1] * 63]], queue="predictq")
    assert np.allclose(lists.get(timeout=60), reference(model_path, x), atol=1e-6)
    assert maps.get(timeout=60)["__ndarray__"] == 1
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 64\], received \[1, 63\]"):
        bad.get(timeout=60)

    record = json.loads(stored(server, lists.id))
    assert record["status"] == "SUCCESS" and record["task_id"] == lists.id
    assert np.allclose(record["result"], reference(model_path, x), atol=1e-6)
    record = json.loads(stored(server, maps.id))
    out = record["result"]
    assert (out["dtype"], out["shape"]) == ("<f4", [3, CLASSES])
    decoded = np.frombuffer(base64.b64decode(out["data"]), "<f4").reshape(3, CLASSES)
    # Not bit-for-bit against the reference: batched with `lists`, the matmul sums in another
    # order (CI once saw a 1-ulp difference).
    assert np.allclose(decoded, reference(model_path, x), atol=1e-6)
    record = json.loads(stored(server, bad.id))
    assert record["status"] == "FAILURE" and record["traceback"] is None
    assert record["result"] == {
        "exc_type": "InvalidInput",
        "exc_module": "predictq.errors",
        "exc_message": ["input 'x': expected shape [N, 64], received [1, 63]"],
    }


def test_a_msgpack_job_keeps_its_msgpack_record_and_the_producer_reads_both_kinds(
    sender: Celery, server: RedisServer, model_path: str
) -> None:
    x = np.random.default_rng(2).random((2, FEATURES), dtype=np.float32)
    lists = sender.send_task(PREDICT, args=[x.tolist()], queue="predictq")
    maps = sender.send_task(PREDICT, args=[ndarray_map(x)], queue="predictq")
    bad = sender.send_task(PREDICT, args=[[[0.1] * 63]], queue="predictq")
    with PredictionClient(
        broker_url=server.url(0), result_backend=server.url(1), result_timeout_s=60
    ) as client:
        good = client.submit(x)
        failed = client.submit(np.ones((1, 63), np.float32))
        assert np.allclose(good.get(), reference(model_path, x), atol=1e-6)
        with pytest.raises(InvalidInput, match=r"received \[1, 63\]"):
            failed.get()
        # Jobs sent by another client: what that client reads (lists, or arrays from maps).
        assert np.allclose(client.job(lists.id).get(), reference(model_path, x), atol=1e-6)
        from_maps = client.job(maps.id).get()
        assert isinstance(from_maps, np.ndarray) and from_maps.dtype == np.float32
        assert np.allclose(from_maps, reference(model_path, x), atol=1e-6)
        with pytest.raises(InvalidInput, match=r"received \[1, 63\]"):
            client.job(bad.id).get()
    raw = stored(server, good.id)
    assert 0x80 <= raw[0] <= 0x8F  # a msgpack map, as before
    record = msgpack.unpackb(stored(server, failed.id))
    assert record["status"] == "FAILURE" and record["traceback"] is None
    assert record["result"]["exc_type"] == "InvalidInput"


def test_a_python_celery_client_sending_msgpack_reads_arrays_with_the_readme_settings(
    server: RedisServer, worker: WorkerProcess, model_path: str
) -> None:
    register_serializer()
    app = Celery("msgpack", broker=server.url(0), backend=server.url(1), set_as_current=False)
    app.conf.update(
        task_serializer="predictq-msgpack",
        result_serializer=RESULT_SERIALIZER,
        result_accept_content=[RESULT_CONTENT_TYPE],
    )
    x = np.random.default_rng(3).random((4, FEATURES), dtype=np.float32)
    try:
        out = app.send_task(PREDICT, args=[x], queue="predictq").get(timeout=60)
    finally:
        close_client(app)
    assert isinstance(out, np.ndarray) and np.allclose(out, reference(model_path, x), atol=1e-6)


def test_an_output_json_numbers_cannot_carry_fails_as_lists_and_travels_as_a_map(
    plain: Celery,
) -> None:
    # Finite inputs so large that the model's hidden layer overflows.
    x = np.full((1, FEATURES), 3e38, np.float32)
    as_map = plain.send_task(PREDICT, args=[ndarray_map(x)], queue="predictq").get(timeout=60)
    out = np.frombuffer(base64.b64decode(as_map["data"]), as_map["dtype"])
    assert not np.isfinite(out).all()  # the premise: this output is not finite
    as_lists = plain.send_task(PREDICT, args=[x.tolist()], queue="predictq")
    with pytest.raises(PredictionError, match="NaN or infinity, which JSON numbers cannot carry"):
        as_lists.get(timeout=60)


# --- tracebacks ------------------------------------------------------------------------------

STORE_A_FAILURE = """
import sys, traceback
from celery.app.task import Context
from workers.app import app
from workers.results import JSON_RESULT

try:
    raise ValueError("boom")
except ValueError as e:
    for task_id, json_result in ((sys.argv[1], True), (sys.argv[2], False)):
        app.backend.mark_as_failure(
            task_id, e, traceback.format_exc(), request=Context({JSON_RESULT: json_result})
        )
"""


@pytest.mark.parametrize("setting", ["false", "true"])
def test_failure_records_carry_the_traceback_only_when_the_setting_says_so(
    server: RedisServer, setting: str
) -> None:
    ids = [f"tb-{setting}-json", f"tb-{setting}-msgpack"]
    env = base_env(
        PREDICTQ_BROKER_URL=server.url(0),
        PREDICTQ_RESULT_BACKEND=server.url(1),
        PREDICTQ_RESULT_TRACEBACKS=setting,
    )
    out = subprocess.run(
        [sys.executable, "-c", STORE_A_FAILURE, *ids],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(stored(server, ids[0])), msgpack.unpackb(stored(server, ids[1]))]
    for record in records:
        assert record["result"]["exc_type"] == "ValueError"
        assert record["result"]["exc_message"] == ["boom"]
        if setting == "true":
            assert 'File "<string>"' in record["traceback"]
        else:
            assert record["traceback"] is None


def test_a_refused_message_is_answered_in_json_unless_it_was_msgpack(
    sender: Celery, server: RedisServer
) -> None:
    register_serializer()
    with PredictionClient(
        broker_url=server.url(0), result_backend=server.url(1), result_timeout_s=60
    ) as client:
        for serializer in ("json", "predictq-msgpack"):
            # An eta is refused before anything runs (predictq never holds jobs).
            result = sender.send_task(
                PREDICT,
                args=[[[0.1] * FEATURES]],
                queue="predictq",
                countdown=60,
                serializer=serializer,
            )
            with pytest.raises(InvalidInput, match="expected no 'eta'"):
                client.job(result.id).get()
            raw = stored(server, result.id)
            record = json.loads(raw) if serializer == "json" else msgpack.unpackb(raw)
            assert record["result"]["exc_type"] == "InvalidMessage"
            assert record["traceback"] is None

"""The worker's result backend storing a coalesced message's jobs (workers/results.py).

A real Redis of this module's own, so that its command counts are this test's
alone, and the backend exactly as a worker builds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from celery import Celery

from predictq.celeryconf import celery_config
from predictq.codec import CONTENT_TYPE, loads_result, register_serializer
from predictq.errors import InvalidInput
from predictq.settings import Settings
from predictq_ops.redis_server import RedisServer
from workers.results import (
    JSON_RESULT,
    TRACEBACKS_CONF,
    JobOutcome,
    refusal_request,
    result_backend,
    set_model_version,
    store_job_outcomes,
)


@pytest.fixture()
def app(server: RedisServer) -> Iterator[Celery]:
    register_serializer()
    settings = Settings.from_env(
        {}, broker_url=server.url(0), result_backend=server.url(1), result_ttl_s=600
    )
    config = celery_config(settings)
    config[TRACEBACKS_CONF] = False
    config["result_failure_expires"] = 60
    app = Celery("result-store", set_as_current=False)
    app.conf.update(config)
    yield app
    app.close()


@pytest.fixture()
def backend(app: Celery) -> Any:
    return result_backend(app)


@pytest.fixture()
def db(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url(1))
    client.flushdb()
    yield client
    client.close()


def calls(db: redis.Redis, command: str) -> int:
    stats = db.info("commandstats").get(f"cmdstat_{command}", {})
    return int(stats.get("calls", 0))


def record(db: redis.Redis, backend: Any, job_id: str) -> dict[str, Any]:
    raw = db.get(backend.get_key_for_task(job_id))
    assert raw is not None, job_id
    decoded = loads_result(raw)
    assert isinstance(decoded, dict)
    return decoded


def test_a_group_of_successes_costs_one_pipeline_whatever_its_size(
    backend: Any, db: redis.Redis
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(12, 1)
    outcomes = [JobOutcome(f"job-{i}", x[i : i + 1], False, 3) for i in range(12)]
    before = {c: calls(db, c) for c in ("get", "mget", "set", "publish", "multi")}
    with db.pubsub() as sub:
        sub.subscribe(*(backend.get_key_for_task(o.job_id) for o in outcomes))
        store_job_outcomes(backend, outcomes)
        published: set[str] = set()
        while len(published) < 12:
            # Subscribe confirmations arrive first, as messages of their own.
            message = sub.get_message(timeout=10)
            assert message is not None, f"published: {sorted(published)}"
            if message["type"] == "message":
                published.add(message["channel"].decode())
    grown = {c: calls(db, c) - n for c, n in before.items()}
    # Celery's store_result: a GET and a MULTI of SETEX + PUBLISH per job.
    assert grown == {"get": 0, "mget": 0, "set": 12, "publish": 12, "multi": 0}
    for i, o in enumerate(outcomes):
        stored = record(db, backend, o.job_id)
        assert stored["status"] == "SUCCESS" and stored["task_id"] == o.job_id
        assert stored["model_version"] == 3
        assert np.array_equal(stored["result"], x[i : i + 1])
        ttl = db.ttl(backend.get_key_for_task(o.job_id))
        assert 590 <= ttl <= 600


def test_records_read_exactly_as_celerys_own_for_a_single_job(
    backend: Any, db: redis.Redis
) -> None:
    x = np.ones((2, 3), np.float32)
    error = InvalidInput("input 'x': expected shape [N, 3], received [2, 4]")
    store_job_outcomes(
        backend,
        [
            JobOutcome("many-ok", x, False, 1),
            JobOutcome("many-json", x.tolist(), True, 1),
            JobOutcome("many-bad", error, True),
        ],
    )
    json_request = refusal_request("application/json")
    msgpack_request = refusal_request("application/x-predictq-msgpack")
    msgpack_request.id = "one-ok"
    backend.store_result("one-ok", x, "SUCCESS", request=msgpack_request)
    json_request.id = "one-json"
    backend.store_result("one-json", x.tolist(), "SUCCESS", request=json_request)
    bad_request = refusal_request("application/json")
    bad_request.id = "one-bad"
    backend.store_result("one-bad", error, "FAILURE", traceback="tb", request=bad_request)
    assert getattr(json_request, JSON_RESULT) is True

    for kind in ("ok", "json", "bad"):
        many = db.get(backend.get_key_for_task(f"many-{kind}"))
        one = db.get(backend.get_key_for_task(f"one-{kind}"))
        assert many is not None and one is not None
        # The same encoding (JSON records are JSON text, msgpack ones a map).
        assert (many[:1] == b"{") == (one[:1] == b"{") == (kind != "ok")
        a, b = loads_result(many), loads_result(one)
        for r in (a, b):
            r.pop("task_id"), r.pop("date_done"), r.pop("model_version", None)
        assert a.keys() == b.keys()
        assert repr(a) == repr(b)
    assert record(db, backend, "many-bad")["traceback"] is None
    assert db.ttl(backend.get_key_for_task("many-bad")) <= 60  # result_failure_expires


def test_each_success_of_a_message_gets_its_own_result_id_version_and_format(
    backend: Any, db: redis.Redis
) -> None:
    # Records after a message's first success are copies of it (workers/results.py):
    # mixed formats, versions and failures must not leak from one job to another.
    x = np.arange(6, dtype=np.float32).reshape(6, 1)
    jobs = [
        JobOutcome("m-0", x[0:1], False, 1),
        JobOutcome("m-1", x[1:2].tolist(), True, 1),
        JobOutcome("m-2", InvalidInput("bad"), False),
        JobOutcome("m-3", x[3:4], False, 2),
        JobOutcome("m-4", x[4:5], False),
        JobOutcome("m-5", x[5:6].tolist(), True, 7),
        JobOutcome("m-6", x[5:6], False),
    ]
    store_job_outcomes(backend, jobs)
    for o in jobs:
        request = refusal_request("application/json" if o.json_result else CONTENT_TYPE)
        request.id = f"one-{o.job_id}"
        if o.model_version is not None:
            set_model_version(request, o.model_version)
        state = "FAILURE" if isinstance(o.outcome, Exception) else "SUCCESS"
        backend.store_result(request.id, o.outcome, state, request=request)
        many, one = record(db, backend, o.job_id), record(db, backend, request.id)
        assert many.pop("task_id") == o.job_id and one.pop("task_id") == request.id
        assert many.get("model_version") == o.model_version
        many.pop("date_done"), one.pop("date_done")
        assert repr(many) == repr(one), o.job_id
        raw = db.get(backend.get_key_for_task(o.job_id))
        assert raw is not None and (raw[:1] == b"{") == o.json_result


def test_a_stored_success_is_never_overwritten_and_the_others_are_written(
    backend: Any, db: redis.Redis
) -> None:
    # A redelivered message whose first run stored some answers: the second run
    # (here failing, e.g. its deadline passed meanwhile) must not clobber them.
    store_job_outcomes(backend, [JobOutcome("first", np.ones((1, 1), np.float32), False, 1)])
    store_job_outcomes(backend, [JobOutcome("failed-before", InvalidInput("bad"), False)])
    late = InvalidInput("the job's deadline passed before it ran")
    store_job_outcomes(
        backend,
        [
            JobOutcome("first", late, False),
            JobOutcome("failed-before", np.zeros((1, 1), np.float32), False, 2),
            JobOutcome("new", late, False),
        ],
    )
    assert record(db, backend, "first")["status"] == "SUCCESS"
    retried = record(db, backend, "failed-before")
    assert retried["status"] == "SUCCESS" and retried["model_version"] == 2
    assert record(db, backend, "new")["status"] == "FAILURE"


def test_only_failures_are_read_before_writing_and_a_success_is_written_again(
    backend: Any, db: redis.Redis
) -> None:
    # The read guards against a failure clobbering a success; a second success
    # (a redelivered job, computed again, here by a new model version) is
    # written over the first without it.
    store_job_outcomes(backend, [JobOutcome("again", np.ones((1, 1), np.float32), False, 1)])
    mgets = calls(db, "mget")
    store_job_outcomes(
        backend,
        [
            JobOutcome("again", np.full((1, 1), 2, np.float32), False, 2),
            JobOutcome("late-1", InvalidInput("the job's deadline passed before it ran"), False),
            JobOutcome("late-2", InvalidInput("the job's deadline passed before it ran"), False),
        ],
    )
    assert calls(db, "mget") == mgets + 1
    again = record(db, backend, "again")
    assert again["status"] == "SUCCESS" and again["model_version"] == 2
    assert np.array_equal(again["result"], np.full((1, 1), 2, np.float32))
    assert record(db, backend, "late-1")["status"] == "FAILURE"
    assert record(db, backend, "late-2")["status"] == "FAILURE"


def test_a_record_too_large_for_redis_fails_its_own_job_only(backend: Any, db: redis.Redis) -> None:
    backend._MAX_STR_VALUE_SIZE = 400  # a JSON record is text: Celery's limit applies
    store_job_outcomes(
        backend,
        [
            JobOutcome("small", [[0.5]], True, 1),
            JobOutcome("large", [[0.5] * 200], True, 1),
        ],
    )
    assert record(db, backend, "small")["result"] == [[0.5]]
    large = record(db, backend, "large")
    assert large["status"] == "FAILURE"
    assert large["result"]["exc_type"] == "PredictionError"
    assert "the Redis result backend stores at most 400" in large["result"]["exc_message"][0]

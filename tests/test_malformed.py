"""Malformed and hostile broker messages: refused, answered, kept and acked; the worker serves on.

Each case is pushed as raw bytes into the queue of one real threads-pool worker
(on a private Redis), the way a buggy producer in any language could, and is
followed by a valid job that the same worker process must answer correctly.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import numpy as np
import pytest
import redis

from predictq import codec
from predictq.carrier import JOBS_HEADER
from predictq.celeryconf import PREDICT_JOBS_TASK, PREDICT_TASK
from predictq.deadletters import DEAD_LETTER_KEY, DeadLetter
from predictq.errors import (
    DeadlineExceeded,
    InvalidInput,
    InvalidMessage,
    PayloadTooLarge,
    PredictqError,
)
from predictq.kombu_layout import UNACKED_KEY
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.cluster import client_on, worker_on
from tests.support.ops import clean_env, run_cli
from tests.support.processes import WorkerProcess, wait_for

F = models.FEATURES
QUEUE = "hostile"
X = np.linspace(0, 1, 2 * F, dtype=np.float32).reshape(2, F)
JSON_LIMIT = 64 * 1024


def headers(task_id: str, **changes: Any) -> dict[str, Any]:
    """Protocol-2 headers as Celery 5 writes them."""
    h: dict[str, Any] = {
        "lang": "py",
        "task": PREDICT_TASK,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "(...)",
        "kwargsrepr": "{}",
        "origin": "test@hostile",
        "ignore_result": False,
    }
    h.update(changes)
    return h


def envelope(
    task_id: str,
    body: bytes,
    *,
    content_type: Any = codec.CONTENT_TYPE,
    encoding: Any = "binary",
    header_changes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A kombu Redis message envelope, as kombu 5.7 LPUSHes it."""
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers(task_id, **(header_changes or {})),
        "properties": {
            "correlation_id": task_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def mp_body(args: Any = None, kwargs: Any = None, embed: Any = EMBED) -> bytes:
    return codec.dumps([[X] if args is None else args, kwargs or {}, embed])


def raw_mp(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def nd_map(dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"__ndarray__": 1, "dtype": dtype, "shape": shape, "data": b""}


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def item(env: dict[str, Any]) -> bytes:
    return json.dumps(env).encode()


def changed(task_id: str, body: bytes | None = None, **kw: Any) -> bytes:
    return item(envelope(task_id, mp_body() if body is None else body, **kw))


def edited(task_id: str, edit: Callable[[dict[str, Any]], None]) -> bytes:
    env = envelope(task_id, mp_body())
    edit(env)
    return item(env)


@dataclass(frozen=True)
class Case:
    """One crafted message, and what its caller gets."""

    make: Callable[[str], bytes]
    error: type[PredictqError] | None  # None: no usable id, nobody to answer
    match: str
    reason: str
    dead_letter: bool = True


def _json_job(task_id: str, value: Any, **header_changes: Any) -> bytes:
    return changed(
        task_id,
        js(value),
        content_type="application/json",
        encoding="utf-8",
        header_changes=header_changes,
    )


def carrier(task_id: str, entries: Any, **header_changes: Any) -> bytes:
    """A coalesced message (predictq/carrier.py) holding ``entries``, as msgpack."""
    listed = entries if isinstance(entries, list) else []
    ids = [e["id"] for e in listed if isinstance(e, dict) and isinstance(e.get("id"), str)]
    changes = {"task": PREDICT_JOBS_TASK, JOBS_HEADER: ids, **header_changes}
    return changed(task_id, mp_body(args=[entries]), header_changes=changes)


def _headers_list(env: dict[str, Any]) -> None:
    env["headers"] = [["task", PREDICT_TASK]]


CASES: dict[str, Case] = {
    # --- used to kill every worker that received it -------------------------------
    "task header a list": Case(
        lambda t: changed(t, header_changes={"task": [PREDICT_TASK]}),
        InvalidMessage,
        "expected task predictq.noop or predictq.predict or predictq.predict_jobs, received "
        "\\['predictq.predict'\\]",
        "unknown_task",
    ),
    "id a dict": Case(
        lambda t: changed(t, header_changes={"id": {"x": t}}), None, "'id'", "headers"
    ),
    "timelimit a string": Case(
        lambda t: changed(t, header_changes={"timelimit": "10"}),
        InvalidMessage,
        "expected header 'timelimit' as \\[hard, soft\\]",
        "headers",
    ),
    "timelimit of three items": Case(
        lambda t: changed(t, header_changes={"timelimit": [1, 2, 3]}),
        InvalidMessage,
        "expected header 'timelimit'",
        "headers",
    ),
    "content type null": Case(
        lambda t: changed(t, content_type=None),
        InvalidMessage,
        "expected 'content-type' as a string, received null",
        "envelope",
    ),
    "content type empty with a msgpack body": Case(
        lambda t: changed(t, content_type=""),
        InvalidMessage,
        "expected content type application/x-predictq-msgpack or application/json, received ''",
        "content_type",
    ),
    "body 42": Case(
        lambda t: changed(t, raw_mp(42)), InvalidMessage, "expected a protocol-2 body", "body"
    ),
    "body null": Case(
        lambda t: changed(t, raw_mp(None)), InvalidMessage, "expected a protocol-2 body", "body"
    ),
    "body an object": Case(
        lambda t: changed(t, raw_mp({"args": [1]})),
        InvalidMessage,
        "expected a protocol-2 body",
        "body",
    ),
    "body of one item": Case(
        lambda t: changed(t, codec.dumps([[X]])),
        InvalidMessage,
        "expected a protocol-2 body",
        "body",
    ),
    "body of four items": Case(
        lambda t: changed(t, codec.dumps([[X], {}, {}, "extra"])),
        InvalidMessage,
        "received list of length 4",
        "body",
    ),
    "body empty": Case(
        lambda t: changed(t, b""), InvalidMessage, "expected a protocol-2 body", "body"
    ),
    "json body empty": Case(
        lambda t: changed(t, b"", content_type="application/json", encoding="utf-8"),
        InvalidMessage,
        "expected a protocol-2 body",
        "body",
    ),
    # --- used to kill the worker once and be lost -----------------------------------
    "envelope not json": Case(lambda t: b"not json {", None, "", "envelope"),
    "envelope a json list": Case(lambda t: js([1, 2, 3]), None, "", "envelope"),
    "body not base64": Case(
        lambda t: edited(t, lambda e: e.update(body="*** not base64 ***")),
        InvalidMessage,
        "expected 'body' as base64 text",
        "envelope",
    ),
    # --- used to silence the worker (reconnect loop) -------------------------------
    "headers without id": Case(
        lambda t: edited(t, lambda e: e["headers"].pop("id")), None, "", "headers"
    ),
    # --- used to be lost silently, or re-run forever ------------------------------
    "no properties": Case(
        lambda t: edited(t, lambda e: e.pop("properties")),
        InvalidMessage,
        "expected 'properties' as an object, received null",
        "envelope",
    ),
    "no delivery tag": Case(
        lambda t: edited(t, lambda e: e["properties"].pop("delivery_tag")),
        InvalidMessage,
        "expected properties.delivery_tag as a non-empty string",
        "envelope",
    ),
    "unknown body encoding": Case(
        lambda t: edited(t, lambda e: e["properties"].update(body_encoding="rot13")),
        InvalidMessage,
        "expected properties.body_encoding 'base64', received 'rot13'",
        "envelope",
    ),
    "delivery info a string": Case(
        lambda t: edited(t, lambda e: e["properties"].update(delivery_info="x")),
        InvalidMessage,
        "expected properties.delivery_info as an object",
        "envelope",
    ),
    "priority a string": Case(
        lambda t: edited(t, lambda e: e["properties"].update(priority="high")),
        InvalidMessage,
        "expected properties.priority as an integer",
        "envelope",
    ),
    "headers a list": Case(lambda t: edited(t, _headers_list), None, "", "envelope"),
    "headers null": Case(
        lambda t: edited(t, lambda e: e.update(headers=None)), None, "", "envelope"
    ),
    "headers without task": Case(
        lambda t: edited(t, lambda e: e["headers"].pop("task")),
        InvalidMessage,
        "received None; this worker runs no other task",
        "unknown_task",
    ),
    "kwargs a list": Case(
        lambda t: changed(t, codec.dumps([[], [X], EMBED])),
        InvalidMessage,
        "expected kwargs",
        "body",
    ),
    "embed a string": Case(
        lambda t: changed(t, mp_body(embed="callbacks")), InvalidMessage, "expected embed", "body"
    ),
    "embed with an unknown key": Case(
        lambda t: changed(t, mp_body(embed={"id": "another", "delivery_info": {}})),
        InvalidMessage,
        "expected embed",
        "body",
    ),
    "id an int": Case(lambda t: changed(t, header_changes={"id": 12345}), None, "", "headers"),
    "id too long": Case(
        lambda t: changed(t, header_changes={"id": "x" * 300}), None, "", "headers"
    ),
    # --- used to reach the caller untyped -----------------------------------------
    "json ndarray map with a sub-array dtype": Case(
        lambda t: _json_job(
            t, [[{"__ndarray__": 1, "dtype": "(-1,)f4", "shape": [1, F], "data": ""}], {}, EMBED]
        ),
        InvalidInput,
        "expected a numpy dtype string such as '<f4', received '\\(-1,\\)f4'",
        "input",
        dead_letter=False,
    ),
    "msgpack ndarray map with a sub-array dtype": Case(
        lambda t: changed(t, raw_mp([[nd_map("(-1,)f4", [1, F])], {}, {}])),
        InvalidInput,
        "expected a numpy dtype string",
        "input",
        dead_letter=False,
    ),
    "shape past numpy's range": Case(
        lambda t: changed(t, raw_mp([[nd_map("<f4", [2**62, 2**62, 0])], {}, {}])),
        InvalidInput,
        "is not usable",
        "input",
        dead_letter=False,
    ),
    "args an int": Case(
        lambda t: changed(t, raw_mp([7, {}, {}])), InvalidMessage, "expected args", "body"
    ),
    "kwargs with int keys": Case(
        lambda t: changed(t, raw_mp([[], {1: 2}, {}])), InvalidMessage, "string keys", "body"
    ),
    "garbage chain": Case(
        lambda t: changed(t, mp_body(embed={**EMBED, "chain": "x"})),
        InvalidMessage,
        "expected embed 'chain'",
        "body",
    ),
    "garbage callbacks": Case(
        lambda t: changed(t, mp_body(embed={**EMBED, "callbacks": [{"task": 1}]})),
        InvalidMessage,
        "expected embed 'callbacks'",
        "body",
    ),
    "unknown task name": Case(
        lambda t: changed(t, header_changes={"task": "tasks.add"}),
        InvalidMessage,
        "received 'tasks.add'",
        "unknown_task",
    ),
    "past expires": Case(
        lambda t: changed(
            t, header_changes={"expires": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}
        ),
        DeadlineExceeded,
        "its deadline passed .* before a worker received it",
        "expired",
        dead_letter=False,
    ),
    "expires not a time": Case(
        lambda t: changed(t, header_changes={"expires": "tomorrow"}),
        InvalidMessage,
        "expected header 'expires' as an ISO 8601 time",
        "headers",
    ),
    # --- other doors --------------------------------------------------------------
    "celery.accumulate": Case(
        lambda t: changed(t, header_changes={"task": "celery.accumulate"}),
        InvalidMessage,
        "received 'celery.accumulate'",
        "unknown_task",
    ),
    "celery.chord_unlock": Case(
        lambda t: changed(t, header_changes={"task": "celery.chord_unlock"}),
        InvalidMessage,
        "received 'celery.chord_unlock'",
        "unknown_task",
    ),
    "eta a day ahead": Case(
        lambda t: changed(
            t, header_changes={"eta": (datetime.now(UTC) + timedelta(days=1)).isoformat()}
        ),
        InvalidMessage,
        "expected no 'eta'",
        "eta",
    ),
    "gzip-compressed body": Case(
        lambda t: changed(t, gzip.compress(mp_body()), header_changes={"compression": "gzip"}),
        InvalidMessage,
        "expected an uncompressed body",
        "compressed",
    ),
    "json body over its limit": Case(
        lambda t: _json_job(t, [[[[0] * F] * (JSON_LIMIT // 30)], {}, EMBED]),
        PayloadTooLarge,
        "PREDICTQ_MAX_JSON_BYTES",
        "too_large",
    ),
    "pickle": Case(
        lambda t: changed(t, b"\x80\x04K\x01.", content_type="application/x-python-serialize"),
        InvalidMessage,
        "pickle is never accepted",
        "content_type",
    ),
    "msgpack with a utf-8 encoding": Case(
        lambda t: changed(t, encoding="utf-8"),
        InvalidMessage,
        "expected content encoding 'binary'",
        "content_type",
    ),
    "not utf-8 at all": Case(lambda t: b"\xff\xfe\x00garbage", None, "", "envelope"),
    # --- coalesced messages: what would fail every job is refused ------------------
    "carrier argument not a list": Case(
        lambda t: changed(t, mp_body(args=[42]), header_changes={"task": PREDICT_JOBS_TASK}),
        InvalidMessage,
        "predictq.predict_jobs expects exactly one argument, a list of job entries",
        "body",
    ),
    "carrier of no job": Case(
        lambda t: carrier(t, []),
        InvalidMessage,
        "between 1 and 4096 job entries, received 0",
        "body",
    ),
    "carrier entry not a map": Case(
        lambda t: carrier(t, [{"id": t + "-a", "inputs": X}, [1, 2]]),
        InvalidMessage,
        "every job entry as a map, received list",
        "body",
    ),
    "carrier job ids header a string": Case(
        lambda t: carrier(t, [{"id": t + "-a", "inputs": X}], **{JOBS_HEADER: "a,b"}),
        InvalidMessage,
        "expected header 'predictq_jobs' as a list of job id strings",
        "headers",
    ),
}


@pytest.fixture(scope="module")
def worker(server: RedisServer, mlp_path: str) -> Iterator[WorkerProcess]:
    w = worker_on(
        server,
        mlp_path,
        queue=QUEUE,
        name="hostile",
        concurrency=4,
        env={"PREDICTQ_MAX_JSON_BYTES": str(JSON_LIMIT)},
    ).start()
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def client(server: RedisServer, worker: WorkerProcess) -> Iterator[PredictionClient]:
    with client_on(server, queue=QUEUE, result_timeout_s=30) as c:
        yield c


def dead_letters(server: RedisServer) -> list[DeadLetter]:
    r = redis.Redis.from_url(server.url(0))
    try:
        return [DeadLetter.from_json(x) for x in r.lrange(DEAD_LETTER_KEY, 0, -1)]
    finally:
        r.close()


def unacked(server: RedisServer, *, besides: str | None = None) -> list[str]:
    """Task ids (or the raw entry) of messages still reserved, other than job ``besides``.

    A job's ack follows its result (late ack, on the consumer's event loop), so
    the valid job just answered may still be reserved; a refused message is
    acknowledged before the consumer takes the next message.
    """
    r = redis.Redis.from_url(server.url(0))
    try:
        entries = r.hvals(UNACKED_KEY)
    finally:
        r.close()
    ids = []
    for raw in entries:
        message = json.loads(raw)[0]
        ids.append(str((message.get("headers") or {}).get("id", raw[:200])))
    return [i for i in ids if i != besides]


def push(server: RedisServer, raw: bytes) -> None:
    r = redis.Redis.from_url(server.url(0))
    try:
        r.lpush(QUEUE, raw)
    finally:
        r.close()


def assert_serves(client: PredictionClient, mlp_path: str, worker: WorkerProcess, pid: int) -> str:
    """A valid job is answered correctly and the worker process is the same; its id."""
    job = client.submit(X)
    out = job.get(timeout=30)
    assert np.allclose(out, models.reference(mlp_path, X), atol=1e-5)
    assert worker.process is not None and worker.process.poll() is None
    assert worker.pid == pid
    return job.id


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_message_is_refused_and_the_same_worker_keeps_serving(
    name: str, server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    case = CASES[name]
    pid = worker.pid
    task_id = str(uuid.uuid4())
    before = len(dead_letters(server))
    push(server, case.make(task_id))
    if case.error is not None:
        started = time.monotonic()
        with pytest.raises(case.error, match=case.match) as caught:
            client.job(task_id).get(timeout=15)
        assert time.monotonic() - started < 10
        assert type(caught.value) is case.error
    # The valid job behind it is answered by the same process: the refusal
    # (answer, dead letter, ack) happened before it, on the consumer thread.
    valid_id = assert_serves(client, mlp_path, worker, pid)
    letters = dead_letters(server)
    if case.dead_letter:
        assert len(letters) == before + 1, worker.log()[-3000:]
        letter = letters[0]
        assert letter.reason == case.reason
        assert letter.queue == QUEUE
        if case.error is not None:
            assert letter.task_id == task_id
        assert letter.message  # the message as it was, for an operator
    else:
        assert len(letters) == before
    assert unacked(server, besides=valid_id) == []


def test_a_dead_letter_is_requeued_and_purged_with_the_cli(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    task_id = str(uuid.uuid4())
    push(server, changed(task_id, header_changes={"task": "predictq.nope"}))
    with pytest.raises(InvalidMessage):
        client.job(task_id).get(timeout=15)
    env = clean_env(PREDICTQ_BROKER_URL=server.url(0), PREDICTQ_RESULT_BACKEND=server.url(1))

    def cli(*args: str) -> str:
        done = run_cli("dead-letters", *args, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listing = cli("list")
    assert task_id in listing and "unknown_task" in listing
    entry = next(e for e in dead_letters(server) if e.task_id == task_id)
    shown = json.loads(cli("show", entry.entry_id[:12]))
    assert shown["task_id"] == task_id
    assert json.loads(shown["message"])["headers"]["task"] == "predictq.nope"
    count = len(dead_letters(server))
    cli("requeue", entry.entry_id)
    # Refused again by the same worker (the cause is not fixed): one new entry
    # replaces the requeued one. The valid job queued behind it is answered
    # only after the consumer thread handled the requeued message.
    assert_serves(client, mlp_path, worker, worker.pid)
    assert len(dead_letters(server)) == count
    assert "purged" in cli("purge")
    assert dead_letters(server) == []


def test_a_payload_key_of_the_wrong_redis_type_fails_alone_and_is_deleted(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    task_id = str(uuid.uuid4())
    key = f"predictq:payload:{task_id}"
    r = redis.Redis.from_url(server.url(0))
    try:
        r.rpush(key, b"not", b"a", b"string")
        push(server, changed(task_id, mp_body(args=[{"__payload__": key}])))
        with pytest.raises(InvalidInput, match="expected a string value at"):
            client.job(task_id).get(timeout=15)
        assert not r.exists(key)
    finally:
        r.close()
    assert_serves(client, mlp_path, worker, worker.pid)


def test_huge_and_compressed_bodies_are_refused_before_they_are_decoded(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    import zlib

    import psutil

    proc = psutil.Process(worker.pid)
    rss_before = proc.memory_info().rss
    # 100 MB of JSON zeros (a 6 GB, 54 s parse before) and a gzip bomb that
    # unpacks to 256 MB (the worker went to 9.4 GB on a 1 MB one before).
    zeros = b"[[[" + b"0," * (50 * 1024 * 1024) + b"0]],{},{}]"
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz = b"".join(bomb.compress(b"\0" * (1 << 20)) for _ in range(256)) + bomb.flush()
    cases = [
        (
            changed(str(uuid.uuid4()), zeros, content_type="application/json", encoding="utf-8"),
            PayloadTooLarge,
        ),
        (changed(str(uuid.uuid4()), gz, header_changes={"compression": "gzip"}), InvalidMessage),
    ]
    for raw, error in cases:
        task_id = json.loads(raw)["headers"]["id"]
        started = time.monotonic()
        push(server, raw)
        with pytest.raises(error):
            client.job(task_id).get(timeout=60)
        valid_id = assert_serves(client, mlp_path, worker, worker.pid)
        took_s = time.monotonic() - started
        print(f"{error.__name__}: refused and next job answered in {took_s:.2f}s")
        assert took_s < 30
    growth = proc.memory_info().rss - rss_before
    print(f"worker RSS growth over both: {growth / 2**20:.0f} MiB")
    assert growth < 1536 * 2**20
    assert unacked(server, besides=valid_id) == []


def test_two_workers_on_one_queue_survive_a_burst_of_malformed_messages(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    second = worker_on(
        server,
        mlp_path,
        queue=QUEUE,
        name="hostile2",
        concurrency=4,
        env={"PREDICTQ_REMOTE_CONTROL": "false"},
    ).start()
    try:
        second.wait_ready()
        pids = (worker.pid, second.pid)
        for name, case in CASES.items():
            push(server, case.make(f"{name}-{uuid.uuid4()}"))
        for _ in range(10):
            valid_id = assert_serves(client, mlp_path, worker, pids[0])
        assert second.process is not None and second.process.poll() is None
        assert second.pid == pids[1]
        # Either worker may still be refusing its last message of the burst (no
        # event says when each is done): poll the reserved set until it drains.
        wait_for(lambda: unacked(server, besides=valid_id) == [], 30, "the burst to be acked")
        # Remote control off: the second worker does not answer a broadcast
        # (nor would it a shutdown, sent the same way); the first one does.
        from celery import Celery

        from predictq.celeryconf import celery_config
        from predictq.settings import Settings

        codec.register_serializer()  # replies come in the workers' serializer
        app = Celery(set_as_current=False)
        app.conf.update(
            celery_config(Settings(broker_url=server.url(0), result_backend=server.url(1)))
        )
        # A loaded worker may answer after the first ping's 3 s: ask until it does.
        seen: list[dict[str, Any]] = []

        def first_answers() -> bool:
            replies = app.control.ping(timeout=3)
            seen.extend(replies)
            return any(n.startswith("hostile@") for reply in replies for n in reply)

        wait_for(first_answers, 60, "the first worker to answer a ping")
        assert not any(n.startswith("hostile2@") for reply in seen for n in reply), seen
    finally:
        second.stop()


def test_health_turns_unhealthy_while_the_broker_is_gone_and_back_when_it_returns(
    mlp_path: str,
) -> None:
    from predictq.readiness import read_records, serving_records

    with RedisServer() as broker, RedisServer() as backend:
        w = WorkerProcess(
            broker_url=broker.url(0),
            result_backend=backend.url(0),
            model_path=mlp_path,
            queue=QUEUE,
            name="flaky",
            concurrency=2,
        ).start()
        results = redis.Redis.from_url(backend.url(0))
        try:
            w.wait_ready()
            assert serving_records(results)
            broker.kill()
            # The model is still loaded (its record stays), but nothing is consumed.
            wait_for(lambda: not serving_records(results), 60, "the consuming key to go")
            assert read_records(results)
            broker.start()
            wait_for(lambda: serving_records(results), 60, "the consuming key to come back")
            assert w.process is not None and w.process.poll() is None
        finally:
            results.close()
            w.stop()


def test_a_crafted_coalesced_message_fails_its_bad_jobs_alone_and_runs_the_others(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    t = str(uuid.uuid4())
    expired = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    entries: list[Any] = [
        {"id": f"{t}-good", "inputs": X},
        {"id": f"{t}-unknown-key", "inputs": X, "priority": 3},
        {"id": 17, "inputs": X},  # no id to answer: it is skipped
        {"id": f"{t}-bad-expires", "inputs": X, "expires": "tomorrow"},
        {"id": f"{t}-expired", "inputs": X, "expires": expired},
        {"id": f"{t}-other-payload", "inputs": {"__payload__": "predictq:payload:someone"}},
        {"id": f"{t}-narrow", "inputs": X[:, :3]},
        {"id": f"{t}-no-inputs"},
        {"id": f"{t}-good-2", "inputs": X[:1]},
    ]
    push(server, carrier(t, entries))
    expected = models.reference(mlp_path, X)
    assert np.allclose(client.job(f"{t}-good").get(timeout=15), expected, atol=1e-5)
    assert np.allclose(client.job(f"{t}-good-2").get(timeout=15), expected[:1], atol=1e-5)
    failures = {
        "unknown-key": (InvalidInput, r"received unknown \['priority'\]"),
        "bad-expires": (InvalidInput, "expected 'expires' as an ISO 8601 time"),
        "expired": (DeadlineExceeded, "deadline passed"),
        "other-payload": (InvalidInput, "this job's own key"),
        "narrow": (InvalidInput, r"expected shape \[N, 16\], received \[2, 3\]"),
        "no-inputs": (InvalidInput, r"missing \['inputs'\]"),
    }
    for suffix, (error, match) in failures.items():
        with pytest.raises(error, match=match):
            client.job(f"{t}-{suffix}").get(timeout=15)
    valid_id = assert_serves(client, mlp_path, worker, worker.pid)
    # The carrier is acknowledged after its own summary result is stored, which
    # may come after its jobs' results and the next job's: no event says when.
    wait_for(lambda: unacked(server, besides=valid_id) == [], 30, "the carrier to be acked")


def test_a_refused_coalesced_message_answers_every_job_it_lists(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    t = str(uuid.uuid4())
    ids = [f"{t}-{i}" for i in range(3)]
    entries = [{"id": i, "inputs": X} for i in ids]
    push(server, carrier(t, entries, eta="2030-01-01T00:00:00+00:00"))
    for job_id in [t, *ids]:
        with pytest.raises(InvalidMessage, match="expected no 'eta'"):
            client.job(job_id).get(timeout=15)
    assert_serves(client, mlp_path, worker, worker.pid)


def test_a_json_coalesced_message_from_another_language_gets_json_results(
    server: RedisServer, worker: WorkerProcess, client: PredictionClient, mlp_path: str
) -> None:
    t = str(uuid.uuid4())
    entries = [
        {"id": f"{t}-lists", "inputs": X.tolist()},
        {"id": f"{t}-bad", "inputs": [[1.0, 2.0]]},
    ]
    raw = changed(
        t,
        js([[entries], {}, EMBED]),
        content_type="application/json",
        encoding="utf-8",
        header_changes={"task": PREDICT_JOBS_TASK, JOBS_HEADER: [e["id"] for e in entries]},
    )
    push(server, raw)
    out = client.job(f"{t}-lists").get(timeout=15)
    assert np.allclose(np.asarray(out), models.reference(mlp_path, X), atol=1e-5)
    with pytest.raises(InvalidInput, match=r"received \[1, 2\]"):
        client.job(f"{t}-bad").get(timeout=15)
    r = redis.Redis.from_url(server.url(1))
    try:
        record = json.loads(r.get(f"celery-task-meta-{t}-lists") or b"")
        summary = json.loads(r.get(f"celery-task-meta-{t}") or b"")
    finally:
        r.close()
    assert record["status"] == "SUCCESS" and isinstance(record["result"], list)
    assert summary["result"] == {
        "jobs": 2,
        "succeeded": 1,
        "failed": 1,
        "models": {"default": [1]},
    }

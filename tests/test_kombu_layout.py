"""predictq/kombu_layout.py against the installed kombu: key names, the envelope, reading ids.

A kombu upgrade that renames a key, reorders or adds a field of the Redis
message, or moves the task id fails here. Real redis-server, no worker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import redis
from kombu import Connection
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.transport.redis import Channel
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from predictq import kombu_layout
from predictq.carrier import JOBS_HEADER, entry
from predictq.celeryconf import PREDICT_JOBS_TASK, PREDICT_TASK, SENT_AT_HEADER
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient, wire
from producer.sender import Outgoing
from producer.wire import JobInput

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture()
def client(server: RedisServer, queue: str) -> Iterator[PredictionClient]:
    with PredictionClient(broker_url=server.url(0), result_backend=server.url(1), queue=queue) as c:
        yield c


@pytest.fixture()
def channel(server: RedisServer) -> Iterator[Any]:
    """A kombu Redis channel of the installed kombu, on the test's server."""
    with Connection(server.url(0)) as conn:
        yield conn.default_channel


def test_key_names_are_the_installed_kombus(channel: Any, queue: str) -> None:
    # The installed kombu's value first, then the copy.
    assert channel.sep == Channel.sep == kombu_layout.PRIORITY_SEP
    assert list(channel.priority_steps) == list(kombu_layout.PRIORITY_STEPS)
    assert channel.unacked_key == Channel.unacked_key == kombu_layout.UNACKED_KEY
    assert channel.body_encoding == kombu_layout.BODY_ENCODING
    assert PERSISTENT_DELIVERY_MODE == kombu_layout.PERSISTENT
    assert kombu_layout.queue_keys(queue) == [
        channel._q_for_pri(queue, step) for step in channel.priority_steps
    ]


def _send_task(client: PredictionClient, task_id: str, x: JobInput, **options: Any) -> None:
    """What predictq publishes, through Celery's own ``send_task`` and kombu's producer."""
    client._app.send_task(
        PREDICT_TASK,
        args=(x.value,),
        task_id=task_id,
        headers={SENT_AT_HEADER: 1.5},
        argsrepr=x.summary,
        ignore_result=False,  # predictq asks for every result (None: the task decides)
        **options,
    )


@pytest.mark.parametrize("deadline_s", [None, 30.0])
def test_envelope_is_what_send_task_pushes_field_by_field(
    client: PredictionClient, server: RedisServer, queue: str, deadline_s: float | None
) -> None:
    x = wire.normalize(np.arange(16, dtype=np.float32).reshape(1, 16))
    expires = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s else None
    _send_task(client, "task-1", x, expires=expires)
    with server.client() as r:
        raw = r.rpop(kombu_layout.list_key(queue))
        assert isinstance(raw, bytes) and r.llen(kombu_layout.list_key(queue)) == 0
    celery = json.loads(raw)
    ours_raw = client._publisher.encode(
        "task-1",
        PREDICT_TASK,
        (x.value,),
        expires=expires,
        headers={SENT_AT_HEADER: 1.5},
        argsrepr=x.summary,
    )
    ours = json.loads(ours_raw)
    # Written as kombu writes JSON (separators, escaping, key order).
    assert kombu_dumps(ours).encode() == ours_raw

    assert list(ours) == list(celery)
    for key in ("body", "content-encoding", "content-type"):
        assert ours[key] == celery[key], key
    assert list(ours["headers"].items()) == list(celery["headers"].items())

    # Celery passes the send_task options create_task_message does not use on
    # to kombu as message properties: `argsrepr` here (the header is what counts).
    extra = set(celery["properties"]) - set(ours["properties"])
    assert extra == {"argsrepr"}
    theirs = {k: v for k, v in celery["properties"].items() if k not in extra}
    props = ours["properties"]
    assert list(props) == list(theirs)
    for key in props:
        if key == "delivery_tag":  # one per message
            assert UUID.match(props[key]) and UUID.match(theirs[key])
            assert props[key] != theirs[key]
        elif key == "expiration":  # the time left, in ms, when each was built
            assert props[key].isdigit() and theirs[key].isdigit()
            assert abs(int(props[key]) - int(theirs[key])) < 10_000
        else:
            assert props[key] == theirs[key], key
    assert props["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert props["correlation_id"] == "task-1"
    assert ("expiration" in props) == (deadline_s is not None)


def test_reader_finds_ids_kombu_wrote_in_every_priority_list_and_the_unacked_hash(
    client: PredictionClient, server: RedisServer, channel: Any, queue: str
) -> None:
    # 4 KB bodies: the id is looked for in the last 2 KB of each message only.
    x = wire.normalize(np.zeros((1, 1024), dtype=np.float32))
    queued = [f"queued-{i}" for i in range(40)]
    for i, task_id in enumerate(queued):
        _send_task(client, task_id, x, priority=(0, 3, 6, 9)[i % 4])
    with server.client() as r:
        sizes = [r.llen(k) for k in kombu_layout.queue_keys(queue)]
    assert sizes == [10, 10, 10, 10]  # kombu used every list that queue_keys names
    # Reserve some with kombu itself: they move to the unacked hash, in its format.
    reserved = [channel.basic_get(queue, no_ack=False) for _ in range(7)]
    reserved_ids = {m.properties["correlation_id"] for m in reserved}
    with server.client() as r:
        assert r.hlen(kombu_layout.UNACKED_KEY) == 7
    # A small chunk: dozens of calls, each reading a few messages.
    reader = kombu_layout.TaskIdReader(server.client(), chunk_bytes=20_000)
    in_lists = [i for key in kombu_layout.queue_keys(queue) for c in reader.ids(key) for i in c]
    in_hash = [i for c in reader.ids(kombu_layout.UNACKED_KEY) for i in c]
    assert sorted(in_lists) == sorted(set(queued) - reserved_ids)
    assert set(in_hash) == reserved_ids
    assert list(reader.ids("no-such-key")) == [[]]


def test_reader_finds_the_jobs_inside_coalesced_messages_queued_and_reserved(
    client: PredictionClient, server: RedisServer, channel: Any, queue: str
) -> None:
    # Lost-job recovery looks for jobs by id: inside a carrier, they must be found.
    x = wire.normalize(np.zeros((1, 1024), dtype=np.float32))
    ours = [[f"ours-{m}-{j}" for j in range(5)] for m in range(3)]
    for ids in ours:
        client._sender.publish([Outgoing(i, x, None) for i in ids])
    # The same through Celery's send_task (what another Python producer writes).
    theirs = [f"theirs-{j}" for j in range(4)]
    client._app.send_task(
        PREDICT_JOBS_TASK,
        args=([entry(i, x.value, None) for i in theirs],),
        task_id="carrier-theirs",
        queue=queue,
        headers={JOBS_HEADER: theirs},
    )
    reserved = channel.basic_get(queue, no_ack=False)  # the oldest: ours[0]
    assert reserved.headers[JOBS_HEADER] == ours[0]
    with server.client() as r:
        reader = kombu_layout.TaskIdReader(r, chunk_bytes=20_000)
        in_list = {i for c in reader.ids(queue) for i in c}
        in_hash = {i for c in reader.ids(kombu_layout.UNACKED_KEY) for i in c}
    assert set(ours[1] + ours[2] + theirs) <= in_list
    assert set(ours[0]) <= in_hash
    assert not set(ours[0]) & in_list
    reserved.ack()


class _MovingQueue(redis.Redis):
    """A client under which the queue moves before every read, as under live traffic.

    Before each read of ``count`` messages, producers LPUSH ``count // 2`` at
    the head (pushing the unread ones past where the queue ended) and a worker
    pops one at the tail.
    """

    queue = ""

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        count = int(keys_and_args[-1])
        for _ in range(max(1, count // 2)):
            super().lpush(self.queue, _message("new"))
        super().rpop(self.queue)
        return super().evalsha(sha, numkeys, *keys_and_args)


def _message(task_id: str) -> bytes:
    return kombu_layout.encode_message(
        b"",
        queue=_MovingQueue.queue,
        content_type="application/json",
        content_encoding="utf-8",
        headers={"id": task_id},
        properties={"correlation_id": task_id, "reply_to": ""},
    )


def test_reader_sees_every_message_that_stays_while_the_queue_moves(
    server: RedisServer, queue: str
) -> None:
    _MovingQueue.queue = queue
    watched = [f"stays-{i}" for i in range(100)]
    with server.client() as r:
        # Oldest first: 200 that get popped, the watched ones, 300 newer ones.
        for task_id in [f"old-{i}" for i in range(200)] + watched + ["newer"] * 300:
            r.lpush(queue, _message(task_id))
    moving = _MovingQueue.from_url(server.url(0))
    # About 12 messages per read: the watched ones are read past the queue's
    # initial end (600), before the worker reaches them.
    reader = kombu_layout.TaskIdReader(moving, chunk_bytes=12 * len(_message("stays-00")))
    seen = [i for chunk in reader.ids(queue) for i in chunk]
    assert set(watched) - set(seen) == set()
    assert len(seen) > 700
    moving.close()


def test_a_message_is_parsed_around_its_body_with_the_same_result(
    client: PredictionClient, server: RedisServer, queue: str
) -> None:
    x = wire.normalize(np.random.default_rng(0).random((40, 16), dtype=np.float32))
    _send_task(client, "task-2", x)  # kombu's own envelope
    with server.client() as r:
        raw = r.rpop(kombu_layout.list_key(queue))
    ours = client._publisher.encode(
        "task-3", PREDICT_TASK, (x.value,), expires=None, headers={}, argsrepr=x.summary
    )
    for item in (raw, ours):
        assert isinstance(item, bytes)
        text = item.decode()
        parsed: list[str] = []

        def loads(s: str, parsed: list[str] = parsed) -> Any:
            parsed.append(s)
            return kombu_loads(s)

        assert kombu_layout.loads_envelope(text, loads) == kombu_loads(text)
        # Only the envelope around the body went through the JSON decoder.
        assert len(parsed) == 1 and len(parsed[0]) < 2000 < len(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"body": "QUJD", "x": 1}',
        '{"body": "a\\u0041b", "x": 1}',  # an escape: not sliced
        '{"body": "ab\\"c", "x": 1}',
        '{"body": "a\nb", "x": 1}',  # a raw control character: invalid JSON
        '{"body": "ab", "body": "cd"}',  # the last one wins, as in json.loads
        '{"body": "ab"}',
        '{"x": 1, "body": "ab"}',
        '{"body": "ab", "x": ',
        '{"body": "\u00e9", "x": 1}',
        "[1, 2]",
        "not json",
    ],
)
def test_parsing_around_the_body_always_agrees_with_json_loads(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except ValueError as e:
        with pytest.raises(type(e)):
            kombu_layout.loads_envelope(text)
    else:
        assert kombu_layout.loads_envelope(text) == expected

"""Commands packed by hiredis in one round trip (predictq/packed.py), against a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from predictq.packed import execute_packed
from predictq_ops.redis_server import RedisServer


@pytest.fixture()
def client(server: RedisServer) -> Iterator[redis.Redis]:
    db = redis.Redis.from_url(server.url(3))
    db.flushdb()
    yield db
    db.close()


def test_replies_come_back_in_order_and_the_values_are_stored(client: redis.Redis) -> None:
    with client.pubsub() as sub:
        sub.subscribe("ch")
        assert sub.get_message(timeout=10) is not None  # the subscription's confirmation
        replies = execute_packed(
            client,
            [
                ("SET", "a", b"\x00bytes\xff", "EX", 60),
                ("SET", "b", "text é"),
                ("PUBLISH", "ch", "hello"),
                ("INCRBY", "n", 7),
                ("GET", "a"),
            ],
        )
        message = sub.get_message(timeout=10)
    assert replies == [b"OK", b"OK", 1, 7, b"\x00bytes\xff"]
    assert client.get("b") == "text é".encode()
    assert 0 < client.ttl("a") <= 60
    assert message is not None and message["data"] == b"hello"


def test_an_error_reply_is_raised_after_every_reply_is_read(client: redis.Redis) -> None:
    client.set("word", "not a number")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        execute_packed(
            client, [("SET", "before", 1), ("INCR", "word"), ("SET", "after", 2), ("GET", "after")]
        )
    # Redis ran the commands after the failing one, and the connection went back
    # to the pool in step: the next command reads its own reply, not a leftover.
    assert client.get("before") == b"1" and client.get("after") == b"2"
    for _ in range(3):
        assert execute_packed(client, [("GET", "after")]) == [b"2"]


def test_a_lost_connection_is_dropped_not_reused() -> None:
    with RedisServer() as own:
        db = redis.Redis.from_url(own.url(0), socket_timeout=5)
        try:
            assert execute_packed(db, [("SET", "k", "v")]) == [b"OK"]
            pooled = db.connection_pool._available_connections[0]
            own.kill()
            with pytest.raises(redis.ConnectionError):
                execute_packed(db, [("SET", "k", "w"), ("GET", "k")])
            # Disconnected before it went back to the pool: its socket is gone,
            # so its next use connects afresh.
            assert pooled._sock is None
            own.restart()
            assert execute_packed(db, [("SET", "k", "x"), ("GET", "k")]) == [b"OK", b"x"]
        finally:
            db.close()


def test_no_commands_sends_nothing(client: redis.Redis) -> None:
    assert execute_packed(client, []) == []

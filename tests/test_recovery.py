"""Lost-job recovery (producer/recovery.py) against a real redis-server: sweeps run on demand.

A job is published again only when it is missing from the queue lists and the
unacked hash in two consecutive sweeps and has no result; the reads are chunked,
so a sweep over a deep queue leaves Redis responsive.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import redis
from kombu import Connection

from predictq.kombu_layout import UNACKED_KEY, encode_message, list_key, queue_keys
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient, wire
from producer.recovery import LostJobRecovery


def message(queue: str, task_id: str) -> bytes:
    return encode_message(
        b"{}",
        queue=queue,
        content_type="application/json",
        content_encoding="utf-8",
        headers={"id": task_id, "task": "predictq.predict"},
        properties={"correlation_id": task_id, "reply_to": ""},
    )


class _Hooked(redis.Redis):
    """A client that runs ``before(key, cursor)`` before each chunked read."""

    before: Callable[[str, str], None] = staticmethod(lambda key, cursor: None)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        key, cursor = keys_and_args[0], keys_and_args[1]
        self.before(key.decode() if isinstance(key, bytes) else key, str(cursor))
        return super().evalsha(sha, numkeys, *keys_and_args)


class Harness:
    """A LostJobRecovery whose sweeps the test runs (its own thread is stopped)."""

    def __init__(self, server: RedisServer, queue: str) -> None:
        self.queue = queue
        self.redis = server.client()
        self.client = _Hooked.from_url(server.url(0))
        self.finished: set[str] = set()
        self.republished: list[str] = []
        self.recovery = LostJobRecovery(
            self.client,
            queue_keys(queue),
            lost_after_s=0.0,  # every tracked job is old enough to look for
            results_exist=lambda ids: [i in self.finished for i in ids],
            republish=self.republished.append,
        )
        self.recovery.close()

    def track(self, *task_ids: str) -> None:
        for task_id in task_ids:
            self.recovery.track(task_id)

    def push(self, *task_ids: str) -> None:
        for task_id in task_ids:
            self.redis.lpush(self.queue, message(self.queue, task_id))

    def close(self) -> None:
        self.client.close()
        self.redis.close()


@pytest.fixture()
def harness(server: RedisServer, queue: str) -> Iterator[Harness]:
    h = Harness(server, queue)
    yield h
    h.close()


def test_jobs_deep_in_the_queue_or_reserved_by_kombu_are_never_declared_lost(
    harness: Harness, server: RedisServer, queue: str
) -> None:
    ids = [f"job-{i}" for i in range(3000)]
    harness.push(*ids)
    with Connection(server.url(0)) as conn:
        # Reserved by kombu itself: now only in its unacked hash.
        reserved = [conn.default_channel.basic_get(queue, no_ack=False) for _ in range(5)]
        assert {m.properties["correlation_id"] for m in reserved} == set(ids[:5])
        assert harness.redis.hlen(UNACKED_KEY) == 5
        harness.track(*ids)
        for _ in range(3):
            assert harness.recovery.sweep() == []
    assert harness.republished == []


def test_a_job_missing_in_two_consecutive_sweeps_is_published_again_unless_finished(
    harness: Harness,
) -> None:
    harness.push("queued")
    harness.track("queued", "lost", "finished")
    harness.finished.add("finished")
    assert harness.recovery.sweep() == []  # missing once: only suspected
    assert harness.recovery.sweep() == ["lost"]
    assert harness.republished == ["lost"]


def test_a_job_moving_during_one_sweep_is_not_published_again(harness: Harness) -> None:
    harness.push("moving")
    harness.track("moving")
    # Popped by a worker that has not yet recorded it as reserved: in no list.
    held = harness.redis.rpop(harness.queue)
    assert isinstance(held, bytes)
    assert harness.recovery.sweep() == []
    harness.redis.rpush(harness.queue, held)  # back again (reserved, then restored)
    assert harness.recovery.sweep() == []
    assert harness.recovery.sweep() == []
    assert harness.republished == []


def _reserve(r: redis.Redis, queue: str, raw: bytes, tag: str) -> None:
    """Record a message as kombu does when reserving it: unacked[tag] = [message, ex, rk]."""
    r.hset(UNACKED_KEY, tag, json.dumps([json.loads(raw), "", queue]))


def test_a_job_restored_to_the_queue_head_while_the_lists_are_read_is_found(
    harness: Harness,
) -> None:
    harness.push(*[f"filler-{i}" for i in range(200)])
    _reserve(harness.redis, harness.queue, message(harness.queue, "restored"), "tag-1")

    def restore_mid_list(key: str, cursor: str) -> None:
        if key == harness.queue and cursor != "0" and harness.redis.hdel(UNACKED_KEY, "tag-1"):
            # kombu's restore at worker shutdown: LPUSH, behind the read.
            harness.redis.lpush(harness.queue, message(harness.queue, "restored"))

    harness.client.before = restore_mid_list
    # ("absent" is in neither: the sweep reads everything.)
    assert harness.recovery._missing({"restored", "absent"}) == {"absent"}
    assert harness.redis.hlen(UNACKED_KEY) == 0  # it did move


def test_a_job_reserved_while_the_lists_are_read_is_found(harness: Harness) -> None:
    harness.push("reserved", *[f"filler-{i}" for i in range(200)])  # the oldest: at the tail

    def reserve_mid_list(key: str, cursor: str) -> None:
        if key == harness.queue and cursor != "0" and harness.redis.hlen(UNACKED_KEY) == 0:
            raw = harness.redis.rpop(harness.queue)  # a worker's BRPOP, ahead of the read
            assert isinstance(raw, bytes) and b"reserved" in raw
            _reserve(harness.redis, harness.queue, raw, "tag-2")

    harness.client.before = reserve_mid_list
    assert harness.recovery._missing({"reserved", "absent"}) == {"absent"}
    assert harness.redis.hlen(UNACKED_KEY) == 1  # it did move


_PINGER = """
import json, select, sys, time, redis
r = redis.Redis.from_url(sys.argv[1])
r.ping()
print("ready", flush=True)
latencies = []
while not select.select([sys.stdin], [], [], 0)[0]:
    t = time.perf_counter()
    r.ping()
    latencies.append(time.perf_counter() - t)
print(json.dumps(latencies), flush=True)
"""


def test_a_sweep_over_a_100k_message_queue_keeps_redis_answering_within_milliseconds() -> None:
    queue, depth = "deep", 100_000
    with RedisServer() as server, server.client() as r:
        with PredictionClient(
            broker_url=server.url(0), result_backend=server.url(1), queue=queue
        ) as client:
            x = wire.normalize(np.zeros((1, 64), dtype=np.float32))
            template = client._publisher.encode(
                "TEMPLATE", "predictq.predict", (x.value,), expires=None, headers={}, argsrepr=""
            )
        for start in range(0, depth, 1000):
            batch = [template.replace(b"TEMPLATE", b"q-%d" % i) for i in range(start, start + 1000)]
            r.lpush(list_key(queue), *batch)
        assert r.llen(queue) == depth
        recovery = LostJobRecovery(
            r,
            queue_keys(queue),
            lost_after_s=0.0,
            results_exist=lambda ids: [False] * len(ids),
            republish=lambda task_id: None,
        )
        recovery.close()
        for i in range(1000):  # found nowhere: the sweep reads everything
            recovery.track(f"absent-{i}")
        pinger = subprocess.Popen(
            [sys.executable, "-c", _PINGER, server.url(0)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert pinger.stdout is not None and pinger.stdout.readline().strip() == "ready"
            started = time.monotonic()
            assert recovery.sweep() == []  # the first miss: suspected only
            sweep_s = time.monotonic() - started
            out, _ = pinger.communicate(timeout=60)
        finally:
            pinger.kill()
            pinger.wait()
    latencies_ms = sorted(1000 * s for s in json.loads(out))
    p99_ms = latencies_ms[int(0.99 * (len(latencies_ms) - 1))]
    print(
        f"sweep over {depth:,} messages: {sweep_s:.2f}s; PING from another process: "
        f"{len(latencies_ms)} pings, p50 {latencies_ms[len(latencies_ms) // 2]:.2f} ms, "
        f"p99 {p99_ms:.2f} ms, max {latencies_ms[-1]:.2f} ms"
    )
    assert len(latencies_ms) >= 50, "the pings did not overlap the sweep"
    # The goal is p99 < 10 ms (measured ~1 ms on an idle machine); the bound
    # leaves room for 2 busy CI cores. One atomic scan took ~100s of ms.
    assert p99_ms < 50

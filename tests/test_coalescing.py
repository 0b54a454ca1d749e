"""Coalescing: concurrent submits share broker messages, and each job still reads as its own.

The policy (producer/coalescer.py) is tested with a fake publish; everything
else against a real Redis and real threads-pool workers. Coalescing is forced,
not hoped for: ``HeldPublish`` holds the first publish of a client until the
jobs meant to travel together are queued behind it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from predictq.carrier import JOBS_HEADER
from predictq.celeryconf import PREDICT_JOBS_TASK
from predictq.errors import BrokerUnavailable, DeadlineExceeded, InvalidInput, PoisonJob
from predictq.kombu_layout import UNACKED_KEY
from predictq_ops.redis_server import RedisServer, free_port
from producer import Job, PredictionClient
from producer.coalescer import Coalescer
from producer.collector import ResultCollector
from producer.tickets import Ticket
from tests.support import models
from tests.support.cluster import (
    PoisonedWorker,
    assert_all_correct,
    client_on,
    victim_and_heir,
)
from tests.support.coalescing import HeldPublish, queued, submit_together
from tests.support.layers import HANG, POISON
from tests.support.processes import WorkerProcess, wait_for

F = models.FEATURES


# --- the policy, with a fake publish ------------------------------------------


class FakeSend:
    """Records each message's items; blocks the first call until ``release`` is set."""

    def __init__(self, *, hold_first: bool = True, fail: BaseException | None = None) -> None:
        self.messages: list[list[int]] = []
        self.threads: list[str] = []
        self.holding = threading.Event()
        self.release = threading.Event()
        self._hold = hold_first
        self._fail = fail

    def __call__(self, items: list[int]) -> None:
        if self._hold:
            self._hold = False
            self.holding.set()
            assert self.release.wait(10)
        self.messages.append(list(items))
        self.threads.append(threading.current_thread().name)
        if self._fail is not None:
            raise self._fail


def ticket(item: int, *, samples: int = 1, nbytes: int = 10, waiting: bool = True) -> Ticket[int]:
    return Ticket(item, samples=samples, nbytes=nbytes, on_sent=lambda _e: None, waiting=waiting)


def run_held(
    coalescer: Coalescer[int], send: FakeSend, tickets: list[Ticket[int]]
) -> list[Ticket[int]]:
    """Submit ticket 0 (held in its publish), then the others, then release; all done."""
    with ThreadPoolExecutor(len(tickets)) as pool:
        first = pool.submit(coalescer.submit, tickets[0])
        assert send.holding.wait(10)
        rest = [pool.submit(coalescer.submit, t) for t in tickets[1:]]
        wait_for(lambda: queued(coalescer) == len(tickets) - 1, 10, "the followers to queue")
        send.release.set()
        first.result(10)
        for f in rest:
            f.result(10)
    return tickets


def test_an_idle_job_is_published_at_once_by_its_own_thread() -> None:
    send = FakeSend(hold_first=False)
    coalescer = Coalescer(send, max_jobs=64, max_samples=100, max_bytes=1000)
    t = ticket(1)
    coalescer.submit(t)
    assert t.sent.done() and t.sent.result() is None
    assert send.messages == [[1]]
    assert send.threads == [threading.current_thread().name]


def test_jobs_queued_during_a_publish_go_together_in_the_next_message() -> None:
    send = FakeSend()
    coalescer = Coalescer(send, max_jobs=64, max_samples=100, max_bytes=1000)
    tickets = run_held(coalescer, send, [ticket(i) for i in range(6)])
    assert send.messages == [[0], [1, 2, 3, 4, 5]]
    assert all(t.sent.result() is None for t in tickets)
    assert (coalescer.messages, coalescer.jobs) == (2, 6)


@pytest.mark.parametrize(
    ("bounds", "cost", "expected"),
    [
        ({"max_jobs": 2}, {}, [[0], [1, 2], [3, 4], [5]]),
        ({"max_samples": 7}, {"samples": 3}, [[0], [1, 2], [3, 4], [5]]),
        ({"max_bytes": 25}, {"nbytes": 10}, [[0], [1, 2], [3, 4], [5]]),
        # A job over a bound alone still goes, in a message of its own.
        ({"max_samples": 2}, {"samples": 3}, [[0], [1], [2], [3], [4], [5]]),
    ],
)
def test_a_message_stays_within_its_bounds(
    bounds: dict[str, int], cost: dict[str, int], expected: list[list[int]]
) -> None:
    send = FakeSend()
    limits = {"max_jobs": 64, "max_samples": 100, "max_bytes": 1000, **bounds}
    coalescer = Coalescer(send, **limits)
    run_held(coalescer, send, [ticket(i, **cost) for i in range(6)])
    assert send.messages == expected


def test_a_failed_publish_fails_every_job_of_its_message_each_with_its_own_error() -> None:
    send = FakeSend(fail=BrokerUnavailable("redis is gone"))
    coalescer = Coalescer(send, max_jobs=64, max_samples=100, max_bytes=1000)
    tickets = run_held(coalescer, send, [ticket(i) for i in range(4)])
    errors = [t.sent.exception() for t in tickets]
    assert all(isinstance(e, BrokerUnavailable) and "redis is gone" in str(e) for e in errors)
    assert len({id(e) for e in errors[1:]}) == 3, "threads would share one traceback"


def test_tickets_without_a_waiting_thread_are_published_by_the_release_thread() -> None:
    # asyncio and predict tickets: their callers wait for results, not publishes.
    # The leader's thread publishes its own message only, then returns.
    send = FakeSend()
    coalescer = Coalescer(send, max_jobs=3, max_samples=100, max_bytes=1000)
    leader = ticket(0)
    with ThreadPoolExecutor(1, thread_name_prefix="caller") as pool:
        first = pool.submit(coalescer.submit, leader)
        assert send.holding.wait(10)
        later = [ticket(i, waiting=False) for i in range(1, 8)]
        for t in later:
            coalescer.submit(t)  # returns at once: nothing waits on the loop's behalf
        assert not any(t.sent.done() for t in later)
        send.release.set()
        first.result(10)
    assert all(t.sent.result(10) is None for t in later)
    assert send.messages == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert send.threads[0].startswith("caller")
    assert send.threads[1:] == ["predictq-coalesce"] * 3


def test_bad_bounds_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="max_jobs must be an integer >= 1, got 0"):
        Coalescer(FakeSend(), max_jobs=0, max_samples=1, max_bytes=1)


# --- real Redis, real worker -------------------------------------------------


def message_jobs(worker: WorkerProcess) -> tuple[float, float]:
    """The worker's ``predictq_message_jobs`` histogram: (messages, jobs)."""
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = r.read().decode().splitlines()

    def value(name: str) -> float:
        return next(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " "))

    return value("predictq_message_jobs_count"), value("predictq_message_jobs_sum")


def test_64_threads_each_get_exactly_their_own_output_and_share_messages(
    client: PredictionClient, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    rng = np.random.default_rng(91)
    xs = [rng.random((i % 3 + 1, F), dtype=np.float32) for i in range(64)]
    messages_before, jobs_before = message_jobs(mlp_worker)
    published_before = client._coalescer.messages
    opener, jobs = submit_together(client, [lambda x=x: client.submit(x) for x in xs])
    opener.get(timeout=60)  # its message too is counted by the time the counts are read
    for i, (x, job) in enumerate(zip(xs, jobs, strict=True)):
        assert isinstance(job, Job)
        out = job.get(timeout=60)
        assert out.shape == (len(x), 4), i
        assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5), i
    # 65 jobs: the opener alone, the 64 behind it in one message.
    assert client._coalescer.messages - published_before == 2
    messages, carried = message_jobs(mlp_worker)
    assert (messages - messages_before, carried - jobs_before) == (2, 65)


def test_a_free_running_storm_coalesces_and_every_thread_gets_its_own_rows(
    client: PredictionClient, mlp_path: str
) -> None:
    rng = np.random.default_rng(92)
    xs = rng.random((32, 20, 1, F), dtype=np.float32)

    def caller(i: int) -> list[np.ndarray]:
        return [client.predict(x, timeout=60) for x in xs[i]]

    before = (client._coalescer.messages, client._coalescer.jobs)
    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(caller, range(32)))
    expected = models.reference(mlp_path, xs.reshape(-1, F)).reshape(32, 20, 1, 4)
    assert np.allclose(np.array(outs), expected, atol=1e-5)
    messages = client._coalescer.messages - before[0]
    jobs = client._coalescer.jobs - before[1]
    assert jobs == 640
    assert messages < jobs, "32 concurrent callers never shared a message"


def test_in_one_message_a_bad_job_and_an_expired_one_fail_alone_and_the_others_succeed(
    client: PredictionClient, redis_server: RedisServer, mlp_path: str
) -> None:
    rng = np.random.default_rng(93)
    good = [rng.random((2, F), dtype=np.float32) for _ in range(4)]
    # Travels by reference (PREDICTQ_INLINE_PAYLOAD_BYTES) inside the carrier.
    large = rng.random((1100, F), dtype=np.float32)
    wrong_width = rng.random((1, F - 1), dtype=np.float32)
    calls: list[Callable[[], Job]] = [
        lambda: client.submit(good[0]),
        lambda: client.submit(wrong_width),
        lambda: client.submit(good[1]),
        lambda: client.submit(good[2], deadline_s=0.001),
        lambda: client.submit(large),
        lambda: client.submit(good[3], deadline_s=60),
    ]
    opener, jobs = submit_together(client, calls, linger_s=0.01)
    opener.get(timeout=60)  # so that nothing is pending but what this test checks
    assert all(isinstance(j, Job) for j in jobs)
    ok = [jobs[0], jobs[2], jobs[5]]
    for job, x in zip(ok, [good[0], good[1], good[3]], strict=True):
        assert isinstance(job, Job)
        assert np.allclose(job.get(timeout=60), models.reference(mlp_path, x), atol=1e-5)
    assert isinstance(jobs[4], Job)
    assert np.allclose(jobs[4].get(timeout=60), models.reference(mlp_path, large), atol=1e-5)
    assert isinstance(jobs[1], Job)
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 16\], received \[1, 15\]"):
        jobs[1].get(timeout=60)
    assert isinstance(jobs[3], Job)
    with pytest.raises(DeadlineExceeded):
        jobs[3].get(timeout=60)
    # Another process reads a coalesced job's result by its id, as any job's.
    with PredictionClient(
        broker_url=redis_server.url(0), result_backend=redis_server.url(1), queue="mlp"
    ) as other:
        assert isinstance(jobs[2], Job)
        again = other.job(jobs[2].id).get(timeout=30)
        assert np.allclose(again, models.reference(mlp_path, good[1]), atol=1e-5)
    assert client._collector.pending() == 0


def test_asyncio_submits_coalesce_and_a_cancelled_one_frees_its_slot(
    client: PredictionClient, mlp_path: str
) -> None:
    rng = np.random.default_rng(94)
    xs = [rng.random((i % 4 + 1, F), dtype=np.float32) for i in range(48)]
    held = HeldPublish(client)
    before = (client._coalescer.messages, client._coalescer.jobs)

    async def main() -> list[Any]:
        opener = asyncio.ensure_future(client.apredict(np.ones((1, F), np.float32), timeout=60))
        await asyncio.to_thread(held.holding.wait, 30)
        tasks = [asyncio.ensure_future(client.apredict(x, timeout=60)) for x in xs]
        doomed = asyncio.ensure_future(client.apredict(xs[0], timeout=60))
        everyone = len(xs) + 1
        await asyncio.to_thread(wait_for, lambda: queued(client._coalescer) >= everyone, 30, "all")
        doomed.cancel()  # while queued: it is taken back, never sent
        with pytest.raises(asyncio.CancelledError):
            await doomed
        await asyncio.to_thread(held.release_when_queued, len(xs))
        await opener
        return await asyncio.gather(*tasks)

    outs = asyncio.run(main())
    for i, (x, out) in enumerate(zip(xs, outs, strict=True)):
        assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5), i
    # The opener alone, then the 48 queued behind it in one message.
    assert (client._coalescer.messages - before[0], client._coalescer.jobs - before[1]) == (2, 49)
    # Every slot is free again, the cancelled job's included.
    assert client._collector.pending() == 0
    slots = client.settings.max_in_flight
    assert all(client._slots.acquire(timeout=0) for _ in range(slots))


def test_coalescing_off_sends_every_job_in_its_own_message(
    redis_server: RedisServer, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="mlp",
        coalesce_max_jobs=1,
    ) as alone:
        xs = np.random.default_rng(95).random((4, 1, F), dtype=np.float32)
        _opener, jobs = submit_together(alone, [lambda x=x: alone.submit(x) for x in xs])
        for job, x in zip(jobs, xs, strict=True):
            assert isinstance(job, Job)
            assert np.allclose(job.get(timeout=60), models.reference(mlp_path, x), atol=1e-5)
        assert (alone._coalescer.messages, alone._coalescer.jobs) == (5, 5)


@pytest.mark.parametrize("call", ["submit", "predict"])
def test_jobs_queued_during_an_outage_each_raise_within_their_own_submit_timeout(
    call: str,
) -> None:
    # predict waits on its result only (not on its publish): the publish error
    # reaches it through the result, for the leader and the queued alike.
    with PredictionClient(
        broker_url=f"redis://127.0.0.1:{free_port()}/0",
        result_backend=f"redis://127.0.0.1:{free_port()}/1",
        submit_timeout_s=2,
        max_in_flight=8,
    ) as client:
        send = client.submit if call == "submit" else functools.partial(client.predict, timeout=60)
        held = HeldPublish(client)
        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(send, np.ones((1, F), np.float32))
            assert held.holding.wait(10)
            rest = [pool.submit(send, np.ones((1, F), np.float32)) for _ in range(7)]
            held.release_when_queued(7)
            errors = [f.exception(30) for f in [first, *rest]]
        took_s = time.monotonic() - started
        assert all(isinstance(e, BrokerUnavailable) for e in errors), errors
        # The 7 queued behind the first do not get 2 s more of their own: each
        # job gives up 2 s after it began (4 s if the second publish retried anew).
        assert took_s < 3.5
        assert all(client._slots.acquire(timeout=0) for _ in range(8)), "a slot was not freed"
        assert client._collector.pending() == 0


def test_a_failed_publish_completes_only_a_future_whose_result_has_not_arrived(
    redis_server: RedisServer,
) -> None:
    # The collector and a failed publish may race for one job's future: whoever
    # takes its key out of the pending set completes it, the other leaves it be.
    client = redis.Redis.from_url(redis_server.url(1))
    collector = ResultCollector(client, json.loads, own_prefix="t-fail.")
    try:
        arrived, failed = collector.watch("t-fail.arrived"), collector.watch("t-fail.failed")
        meta = json.dumps({"status": "SUCCESS", "result": 1})
        # Published until the collector's pattern subscription is up and hears it.
        wait_for(
            lambda: client.publish("celery-task-meta-t-fail.arrived", meta) and arrived.done(),
            10,
            "the result to arrive",
        )
        error = BrokerUnavailable("Redis is down")
        collector.fail("t-fail.arrived", error)
        collector.fail("t-fail.failed", error)
        collector.fail("t-fail.unknown", error)
        assert arrived.result(0) == {"status": "SUCCESS", "result": 1}
        assert failed.exception(0) is error
        assert collector.pending() == 0
    finally:
        collector.close()
        client.close()


# --- faults: poison, SIGKILL ---------------------------------------------------


@pytest.fixture()
def own_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.mark.slow
def test_a_poison_job_in_a_coalesced_message_fails_alone_and_its_neighbours_complete(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    path = models.build_poison_model(str(tmp_path / "poison.keras"))
    rng = np.random.default_rng(96)
    xs = [rng.random((1, F), dtype=np.float32) for _ in range(6)]
    poison = np.full((1, F), POISON, np.float32)
    with (
        PoisonedWorker(own_redis, path) as poisoned,
        client_on(own_redis, visibility_timeout_s=2) as client,
    ):
        calls: list[Callable[[], Job]] = [lambda x=x: client.submit(x) for x in xs[:3]]
        calls.append(lambda: client.submit(poison))
        calls += [lambda x=x: client.submit(x) for x in xs[3:]]
        opener, jobs = submit_together(client, calls)
        bad = jobs.pop(3)
        assert isinstance(bad, Job)
        # First delivery: the whole message dies with its worker. Then its jobs
        # run one at a time: the poison one is counted alone, twice, then given up.
        assert poisoned.until_done(bad) == 2
        with pytest.raises(PoisonJob, match=r"ran 2 time\(s\) and its worker process died"):
            bad.get(timeout=10)
        for job, x in zip(jobs, xs, strict=True):
            assert isinstance(job, Job)
            assert np.allclose(job.get(timeout=60), models.reference(path, x), atol=1e-5)
        opener.get(timeout=60)


@pytest.mark.slow
def test_a_worker_sigkilled_holding_coalesced_messages_every_job_completes_once_correct(
    own_redis: RedisServer, hang_model: models.HangModel
) -> None:
    xs = np.random.default_rng(97).random((32 * 40, 1, F), dtype=np.float32)
    # Caller 8's 20th job blocks its device call until the gate opens: the
    # worker dies holding coalesced messages whatever the machine's speed.
    xs[8 * 40 + 20, 0, 0] = HANG
    path = hang_model.path
    with (
        victim_and_heir(own_redis, path, visibility_timeout_s=4, env=models.HANG_IMPORTS) as (
            first,
            heir,
        ),
        # Room for every job: those behind the marked one wait while it blocks.
        client_on(own_redis, visibility_timeout_s=4, max_in_flight=2048) as client,
    ):
        # 32 callers, 40 jobs each: caller i submits rows [40 i, 40 i + 40).
        def caller(i: int) -> list[Job]:
            return [client.submit(x) for x in xs[40 * i : 40 * i + 40]]

        with ThreadPoolExecutor(32) as pool:
            jobs = [job for row in pool.map(caller, range(32)) for job in row]
        assert client._coalescer.messages < client._coalescer.jobs
        wait_for(hang_model.started, 60, "the marked job's device call to start")

        def holds_a_coalesced_message() -> bool:
            with own_redis.client() as r:
                held = [json.loads(m)[0]["headers"] for m in r.hvals(UNACKED_KEY)]
            return any(h["task"] == PREDICT_JOBS_TASK and len(h[JOBS_HEADER]) > 1 for h in held)

        # What only late acks and the visibility timeout bring back: the
        # coalesced messages the worker holds (it keeps reserving while blocked).
        wait_for(holds_a_coalesced_message, 60, "the blocked worker to hold a coalesced message")
        first.kill()  # SIGKILL: coalesced messages queued, reserved and running
        assert any(not j.done() for j in jobs)
        assert holds_a_coalesced_message()
        hang_model.gate.unlink()
        heir.start().wait_ready()
        assert_all_correct(jobs, xs, path)

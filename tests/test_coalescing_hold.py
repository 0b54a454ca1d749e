"""Holding: predict()/apredict() jobs wait to share a message while messages go unanswered.

The policy (producer/coalescer.py) is tested with a fake publish and answer
futures set by the test; the rest against a real Redis and the shared MLP
worker, or a queue no worker serves (nothing ever answers there).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis

from predictq.errors import DeadlineExceeded, PredictqError, ResultTimeout, UnknownModel
from predictq.modelref import ModelRef
from predictq.readiness import ReadinessRecord, consuming_key
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from producer.coalescer import REFILL_MIN_JOBS, Coalescer
from producer.serving import ServingView
from producer.tickets import Ticket
from tests.support import models
from tests.support.coalescing import queued
from tests.support.processes import WorkerProcess, wait_for

F = models.FEATURES


# --- the policy, with a fake publish ------------------------------------------


class Recorder:
    """A fake publish: records each message's items and when it went out."""

    def __init__(self) -> None:
        self.messages: list[list[int]] = []
        self.times: list[float] = []
        self._cond = threading.Condition()

    def __call__(self, items: list[int]) -> None:
        with self._cond:
            self.messages.append(list(items))
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def wait_messages(self, n: int) -> list[list[int]]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.messages) >= n, 10), self.messages
            return [list(m) for m in self.messages]


def held_ticket(
    item: int, answer: Future[Any], *, holdable: bool = True, waiting: bool = False
) -> Ticket[int]:
    return Ticket(
        item,
        samples=1,
        nbytes=10,
        on_sent=lambda _e: None,
        waiting=waiting,
        holdable=holdable,
        answer=answer,
    )


def coalescer_for(
    send: Recorder, *, cap: int = 1, hold_s: float = 10.0, max_jobs: int = 64
) -> Coalescer[int]:
    return Coalescer(
        send,
        max_jobs=max_jobs,
        max_samples=100,
        max_bytes=1000,
        max_unanswered=lambda: cap,
        max_hold_s=hold_s,
    )


def test_holdable_jobs_wait_while_k_messages_are_unanswered_and_go_at_the_first_answer() -> None:
    send = Recorder()
    coalescer = coalescer_for(send, cap=2)
    answers: list[Future[Any]] = [Future() for _ in range(5)]
    coalescer.submit(held_ticket(0, answers[0]))
    coalescer.submit(held_ticket(1, answers[1]))
    assert send.messages == [[0], [1]], "below the cap a job goes at once"
    with ThreadPoolExecutor(3) as pool:  # predict callers: threads waiting for the publish
        calls = [
            pool.submit(coalescer.submit, held_ticket(i, answers[i], waiting=True))
            for i in (2, 3, 4)
        ]
        wait_for(lambda: queued(coalescer) == 3, 10, "three jobs to be held")
        assert send.messages == [[0], [1]]
        answers[1].set_result({})  # the first answer of message [1]
        for call in calls:
            call.result(10)
    assert send.messages[:2] == [[0], [1]] and len(send.messages) == 3
    assert sorted(send.messages[2]) == [2, 3, 4], "the held jobs did not go together"
    assert coalescer.held == 3


def test_a_full_queue_follows_a_large_unanswered_message_at_once_one_past_the_cap() -> None:
    send = Recorder()
    coalescer = coalescer_for(send, cap=1)
    answers: list[Future[Any]] = [Future() for _ in range(14)]
    with ThreadPoolExecutor(1) as pool:  # a message of REFILL_MIN_JOBS jobs, built by holding
        first = pool.submit(coalescer.submit, held_ticket(0, answers[0], waiting=True))
        first.result(10)
    for i in range(1, 1 + REFILL_MIN_JOBS):
        coalescer.submit(held_ticket(i, answers[i]))
    answers[0].set_result({})
    big = list(range(1, 1 + REFILL_MIN_JOBS))
    assert send.wait_messages(2) == [[0], big]
    # As many held jobs as that message carries: they go at once, one past the cap...
    nxt = list(range(1 + REFILL_MIN_JOBS, 1 + 2 * REFILL_MIN_JOBS))
    for i in nxt[:-1]:
        coalescer.submit(held_ticket(i, answers[i]))
    assert len(send.messages) == 2 and queued(coalescer) == REFILL_MIN_JOBS - 1
    coalescer.submit(held_ticket(nxt[-1], answers[nxt[-1]]))  # publishes on this thread
    assert send.messages[2:] == [nxt]
    # ...and never two past it: these wait for an answer, however many they are.
    rest = list(range(1 + 2 * REFILL_MIN_JOBS, 14))
    for i in rest:
        coalescer.submit(held_ticket(i, answers[i]))
    assert len(send.messages) == 3 and queued(coalescer) == len(rest)
    answers[1].set_result({})
    assert send.wait_messages(4)[3] == rest


def test_a_refill_waits_for_as_many_jobs_as_the_message_answered_last_carried() -> None:
    send = Recorder()
    coalescer = coalescer_for(send, cap=1)
    answers: list[Future[Any]] = [Future() for _ in range(17)]
    coalescer.submit(held_ticket(0, answers[0]))
    for i in range(1, 7):  # held behind [0], then one message of 6 jobs
        coalescer.submit(held_ticket(i, answers[i]))
    answers[0].set_result({})
    assert send.wait_messages(2)[1] == [1, 2, 3, 4, 5, 6]
    for i in range(7, 11):  # 4 jobs, fewer than the 6 the newest message carries: held
        coalescer.submit(held_ticket(i, answers[i]))
    answers[1].set_result({})  # the 6-job message is answered: the 4 go
    assert send.wait_messages(3)[2] == [7, 8, 9, 10]
    # The 6-job message's callers come back while the 4-job one computes: all
    # six go together, not a message of 4 (the newest's size) and 2 left behind.
    for i in range(11, 16):
        coalescer.submit(held_ticket(i, answers[i]))
    assert len(send.messages) == 3 and queued(coalescer) == 5
    coalescer.submit(held_ticket(16, answers[16]))  # the sixth: published on this thread
    assert send.messages[3:] == [[11, 12, 13, 14, 15, 16]]


class LateCallbacks(Future[Any]):
    """A result future whose done-callbacks have not run yet (the collector is still busy)."""

    def add_done_callback(self, fn: Any) -> None:
        pass


def test_a_caller_that_got_its_result_before_the_callbacks_ran_is_not_held() -> None:
    send = Recorder()
    coalescer = coalescer_for(send)
    answered = LateCallbacks()
    coalescer.submit(held_ticket(0, answered))
    answered.set_result({})  # wakes the caller, as in predict: it submits again at once
    coalescer.submit(held_ticket(1, Future()))
    assert send.messages == [[0], [1]]
    assert coalescer.held == 0


class CountingDone(Future[Any]):
    """A result future that counts how often ``done()`` is asked."""

    polls = 0

    def done(self) -> bool:
        CountingDone.polls += 1
        return super().done()


def test_a_held_submit_looks_at_two_answers_of_a_message_in_flight_not_all() -> None:
    send = Recorder()
    coalescer = coalescer_for(send, cap=1)
    first = Future[Any]()
    coalescer.submit(held_ticket(0, first))
    answers = [CountingDone() for _ in range(12)]
    for i, answer in enumerate(answers, start=1):  # held behind [0]
        coalescer.submit(held_ticket(i, answer))
    first.set_result({})
    assert send.wait_messages(2)[1] == list(range(1, 13))
    # The 12-job message is in flight, unanswered: each job held behind it
    # polls its first and last answers only, as does the release thread each
    # time a held job wakes it (all 12 each time, before: 60 polls at least).
    CountingDone.polls = 0
    for i in range(13, 18):
        coalescer.submit(held_ticket(i, Future()))
    assert queued(coalescer) == 5
    assert 0 < CountingDone.polls <= 2 * 2 * 5
    # A middle answer done before its callbacks ran is still caught by its callback.
    answers[5].set_result({})
    assert send.wait_messages(3)[2] == [13, 14, 15, 16, 17]


def test_a_release_sends_one_message_within_the_bounds_and_the_rest_wait_for_the_next() -> None:
    send = Recorder()
    coalescer = coalescer_for(send, max_jobs=2)
    answers: list[Future[Any]] = [Future() for _ in range(4)]
    tickets = [held_ticket(i, answers[i]) for i in range(4)]
    for t in tickets:
        coalescer.submit(t)  # asyncio tickets: the release thread publishes them
    answers[0].set_result({})
    assert send.wait_messages(2) == [[0], [1, 2]]
    assert not tickets[3].sent.done() and queued(coalescer) == 1
    answers[2].cancel()  # a forgotten job (timeout, cancelled caller) answers its message too
    assert send.wait_messages(3) == [[0], [1, 2], [3]]


def test_held_jobs_go_after_the_hold_limit_when_no_answer_comes() -> None:
    send = Recorder()
    coalescer = coalescer_for(send, hold_s=0.2)
    coalescer.submit(held_ticket(0, Future()))
    held = [held_ticket(i, Future()) for i in (1, 2)]
    started = time.monotonic()
    for t in held:
        coalescer.submit(t)
    held[1].sent.result(5)
    waited_s = send.times[1] - started
    assert send.messages == [[0], [1, 2]]
    assert 0.2 <= waited_s < 2.0, waited_s


def test_a_job_queued_behind_a_publish_and_left_held_goes_at_the_hold_limit() -> None:
    send = Recorder()
    publishing, finish = threading.Event(), threading.Event()

    def slow_first(items: list[int]) -> None:
        if items == [0]:
            publishing.set()
            assert finish.wait(10)
        send(items)

    coalescer = Coalescer(slow_first, max_jobs=64, max_samples=100, max_bytes=1000, max_hold_s=0.2)
    late = held_ticket(1, Future())
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(coalescer.submit, held_ticket(0, Future(), waiting=True))
        assert publishing.wait(10)
        coalescer.submit(late)  # queued behind the publish, not held by submit itself
        finish.set()
        first.result(10)
    late.sent.result(5)  # the leader left it held: the release thread sends it
    assert send.messages == [[0], [1]]


def test_plain_submits_are_never_held_and_carry_held_jobs_along() -> None:
    send = Recorder()
    coalescer = coalescer_for(send)
    coalescer.submit(held_ticket(0, Future()))
    coalescer.submit(held_ticket(1, Future(), holdable=False, waiting=True))
    assert send.messages == [[0], [1]], "a plain submit went out while a message was unanswered"
    coalescer.submit(held_ticket(2, Future()))
    assert queued(coalescer) == 1
    coalescer.submit(held_ticket(3, Future(), holdable=False, waiting=True))
    assert send.messages == [[0], [1], [2, 3]]


def test_a_withdrawn_job_is_never_published_and_close_fails_the_held_ones() -> None:
    send = Recorder()
    coalescer = coalescer_for(send)
    first: Future[Any] = Future()
    coalescer.submit(held_ticket(0, first))
    gone = held_ticket(1, Future())
    coalescer.submit(gone)
    assert coalescer.withdraw(gone)
    assert isinstance(gone.sent.exception(0), CancelledError)
    assert not coalescer.withdraw(gone)
    with ThreadPoolExecutor(1) as pool:
        waiting = held_ticket(2, Future(), waiting=True)
        call = pool.submit(coalescer.submit, waiting)
        wait_for(lambda: queued(coalescer) == 1, 10, "a job to be held")
        coalescer.close()
        call.result(10)
    with pytest.raises(PredictqError, match="closed"):
        waiting.sent.result(0)
    first.set_result({})
    assert send.messages == [[0]]


def test_no_hold_limit_or_coalescing_off_means_no_holding() -> None:
    for coalescer in (coalescer_for(Recorder(), hold_s=0), coalescer_for(Recorder(), max_jobs=1)):
        for i in range(3):
            t = held_ticket(i, Future())
            coalescer.submit(t)
            assert t.sent.done()
        assert coalescer.held == 0


# --- the cap: serving worker processes, from their readiness records ----------


def test_the_auto_cap_counts_processes_consuming_the_clients_queue(server: RedisServer) -> None:
    db = redis.Redis.from_url(server.url(3))
    records = [
        ("n1", {"queue": "a"}, True),
        ("n2", {}, True),  # a worker from before records named their queue
        ("n3", {"queue": "a"}, False),  # warm, but its consumer is not taking jobs
        ("n4", {"queue": "b"}, True),
    ]
    published = []
    for node, fields, consuming in records:
        record = ReadinessRecord(db, node, 1, 30, fields)
        record._write()
        published.append(record)
        if consuming:
            db.set(consuming_key(node), "1", px=30_000)
    serving = ServingView(db, "a", refresh_s=0.05)
    try:
        assert serving.count() == 1, "the first call answers at once, before any read"
        wait_for(lambda: serving.count() == 2, 10, "the count of serving processes of queue a")
    finally:
        serving.close()
        for record in published:
            record.close()
        db.close()


def test_model_checks_read_records_only_on_a_clients_first_check_and_on_a_miss(
    server: RedisServer,
) -> None:
    db = redis.Redis.from_url(server.url(4))
    served = {"queue": "q", "models": {"m": {"versions": [1], "spec": {}}}, "default_model": "m"}
    record = ReadinessRecord(db, "solo", 1, 30, served)
    record._write()
    db.set(consuming_key("solo"), "1", px=30_000)

    def reads() -> int:  # serving_records asks once per record whether its node consumes
        return int(db.info("commandstats").get("cmdstat_exists", {}).get("calls", 0))

    view = ServingView(db, "q", refresh_s=3600)
    try:
        view.check(ModelRef("m"))  # the first check reads at once...
        # ...and starts the background reader, whose first read lands now.
        wait_for(lambda: not view._wanted.is_set(), 10, "the background read")
        before = reads()
        for _ in range(200):
            view.check(ModelRef("m"))
            view.check(ModelRef("m", 1))
            view.check(ModelRef())
            assert view.count() == 1
        assert reads() == before, "a submit's check read Redis"
        record.update({"models": {"m": {"versions": [1, 2], "spec": {}}}})
        view.check(ModelRef("m", 2))  # a miss: read again once, fresh, and it is there
        assert reads() == before + 1
        with pytest.raises(UnknownModel, match="received 'x'"):
            view.check(ModelRef("x"))
        assert reads() == before + 2
    finally:
        view.close()
        record.close()
        db.close()


# --- real Redis, real worker --------------------------------------------------


def test_a_closed_loop_of_predict_callers_shares_messages(
    redis_server: RedisServer, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    rng = np.random.default_rng(97)
    xs = rng.random((16, 12, 1, F), dtype=np.float32)
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="mlp",
        coalesce_max_unanswered=1,
        coalesce_max_hold_ms=1000,  # released by answers, even on a loaded machine
    ) as client:

        def caller(i: int) -> list[np.ndarray]:
            return [client.predict(x, timeout=60) for x in xs[i]]

        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(caller, range(16)))
        expected = models.reference(mlp_path, xs.reshape(-1, F)).reshape(16, 12, 1, 4)
        assert np.allclose(np.array(outs), expected, atol=1e-5)
        messages, jobs = client._coalescer.messages, client._coalescer.jobs
    assert jobs == 192
    # Without the cap each caller's next job overlaps almost no publish: ~1.2.
    assert jobs / messages > 2, (messages, jobs)


def test_a_lone_predict_goes_at_once_even_with_a_long_hold_limit(client: PredictionClient) -> None:
    with PredictionClient(
        broker_url=client.settings.broker_url,
        result_backend=client.settings.result_backend,
        queue="mlp",
        coalesce_max_unanswered=1,
        coalesce_max_hold_ms=10_000,
    ) as alone:
        started = time.monotonic()
        for _ in range(5):  # each after the previous one's answer: nothing is unanswered
            alone.predict(np.ones((1, F), np.float32), timeout=30)
        assert alone._coalescer.held == 0
        assert time.monotonic() - started < 10


def unserved_client(server: RedisServer, hold_ms: float) -> PredictionClient:
    """A client on a queue no worker serves, capped at 1 unanswered message."""
    return PredictionClient(
        broker_url=server.url(0),
        result_backend=server.url(1),
        queue=f"nobody-{uuid.uuid4().hex[:8]}",
        coalesce_max_unanswered=1,
        coalesce_max_hold_ms=hold_ms,
    )


@pytest.fixture()
def unserved(redis_server: RedisServer) -> Iterator[PredictionClient]:
    """``unserved_client`` holding jobs 300 ms at most."""
    with unserved_client(redis_server, 300) as client:
        yield client


@pytest.fixture()
def unserved_long(redis_server: RedisServer) -> Iterator[PredictionClient]:
    """``unserved_client`` holding jobs the longest it may (10 s): for tests of what
    happens to a held job before its hold ends, however slow the machine."""
    with unserved_client(redis_server, 10_000) as client:
        yield client


class PublishTimes:
    """Records when each of a client's messages goes out."""

    def __init__(self, client: PredictionClient) -> None:
        self._send = client._coalescer._send
        self.times: list[float] = []
        self.sent = [threading.Event() for _ in range(8)]
        client._coalescer._send = self._publish

    def _publish(self, items: list[Any]) -> None:
        self._send(items)
        self.times.append(time.monotonic())
        self.sent[len(self.times) - 1].set()


def test_with_no_worker_a_held_predict_goes_out_after_the_hold_limit(
    unserved: PredictionClient,
) -> None:
    published = PublishTimes(unserved)
    x = np.ones((1, F), np.float32)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(unserved.predict, x, timeout=1.5)
        assert published.sent[0].wait(10)
        started = time.monotonic()
        second = pool.submit(unserved.predict, x, timeout=1.5)
        assert published.sent[1].wait(10)
        waited_s = published.times[1] - started
        for call in (first, second):
            assert isinstance(call.exception(10), ResultTimeout)
    assert unserved._coalescer.held == 1
    assert 0.3 <= waited_s < 1.5, waited_s
    assert unserved.queue_length() == 2


def test_a_held_predict_that_times_out_is_taken_back_unsent_and_frees_its_slot(
    unserved_long: PredictionClient,
) -> None:
    unserved = unserved_long
    x = np.ones((1, F), np.float32)
    unserved.submit(x)  # never held: goes out, and stays unanswered (no worker)
    messages = unserved._coalescer.messages
    # Its hold (10 s) outlasts its timeout: still queued when predict gives up.
    with pytest.raises(ResultTimeout, match=r"no result within 0\.1s"):
        unserved.predict(x, timeout=0.1)
    assert unserved._coalescer.held == 1
    assert queued(unserved._coalescer) == 0, "the timed-out job is still queued"
    assert unserved._coalescer.messages == messages
    assert unserved._collector.pending() == 1  # the submit's job only
    assert unserved.queue_length() == 1


def test_submit_is_never_held_and_a_cancelled_held_apredict_is_never_sent(
    unserved_long: PredictionClient,
) -> None:
    unserved = unserved_long
    x = np.ones((1, F), np.float32)
    jobs = [unserved.submit(x) for _ in range(3)]  # each while the previous is unanswered
    assert unserved._coalescer.held == 0
    assert unserved.queue_length() == 3
    pending = unserved._collector.pending()

    async def cancel_held() -> None:
        task = asyncio.ensure_future(unserved.apredict(x, timeout=30))
        await asyncio.to_thread(wait_for, lambda: queued(unserved._coalescer) == 1, 10, "a hold")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_held())
    assert unserved._coalescer.held == 1
    assert queued(unserved._coalescer) == 0
    assert unserved._coalescer.messages == 3, "the cancelled job was sent"
    assert unserved._collector.pending() == pending, "the cancelled job is still watched"
    free = unserved.settings.max_in_flight - len(jobs)
    assert all(unserved._slots.acquire(timeout=0) for _ in range(free)), "its slot was not freed"
    assert not unserved._slots.acquire(timeout=0)


def test_a_held_job_keeps_its_deadline(
    client: PredictionClient, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    with PredictionClient(
        broker_url=client.settings.broker_url,
        result_backend=client.settings.result_backend,
        queue="mlp",
        coalesce_max_unanswered=1,
        coalesce_max_hold_ms=300,
    ) as held_client:
        published = PublishTimes(held_client)
        x = np.ones((1, F), np.float32)
        # The worker answers nothing while stopped: the first job stays unanswered.
        with ThreadPoolExecutor(2) as pool:
            os.kill(mlp_worker.pid, signal.SIGSTOP)
            try:
                first = pool.submit(held_client.predict, x, timeout=60)
                assert published.sent[0].wait(10)
                late = pool.submit(held_client.predict, x, timeout=60, deadline_s=0.05)
                assert published.sent[1].wait(10)  # after the hold limit, past its deadline
            finally:
                os.kill(mlp_worker.pid, signal.SIGCONT)
            assert np.allclose(first.result(60), models.reference(mlp_path, x), atol=1e-5)
            assert isinstance(late.exception(60), DeadlineExceeded)
        assert held_client._coalescer.held == 1

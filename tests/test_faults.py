"""Crashes, restarts, overload: no job is lost. Real redis-server and worker processes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from predictq.errors import (
    BrokerUnavailable,
    DeadlineExceeded,
    DeviceOutOfMemory,
    PoisonJob,
    QueueFull,
    TooManyInFlight,
)
from predictq_ops.redis_server import RedisServer, free_port
from producer import Job, PredictionClient
from tests.support import backends, models
from tests.support.cluster import (
    PoisonedWorker,
    assert_all_correct,
    client_on,
    inputs,
    victim_and_heir,
    worker_on,
)
from tests.support.layers import HANG, POISON
from tests.support.processes import WorkerProcess, wait_for

F = models.FEATURES


@pytest.fixture()
def aof_redis() -> Iterator[RedisServer]:
    """A private redis-server with AOF persistence (fsync always), so restarts keep data."""
    with RedisServer(appendonly=True) as server:
        yield server


def wait_results(jobs: list[Job], count: int) -> None:
    """Block until ``count`` of ``jobs`` have their result (waiting on the jobs themselves)."""
    for job in jobs[:count]:
        job.get(timeout=120)


@pytest.mark.slow
def test_sigkill_mid_run_loses_nothing_once_a_new_worker_starts(
    aof_redis: RedisServer, hang_model: models.HangModel
) -> None:
    # Job 300's device call blocks until its gate opens, so the worker dies with
    # jobs done, in flight, reserved and still queued, however fast it is: left
    # to race, a producer slower than its worker (a loaded machine) found
    # nothing reserved at the kill.
    path = hang_model.path
    with victim_and_heir(aof_redis, path, visibility_timeout_s=4, env=models.HANG_IMPORTS) as (
        first,
        replacement,
    ):
        x = inputs(1500)
        x[300, 0, 0] = HANG
        # Room for every job: those after job 300 wait while it blocks.
        with client_on(aof_redis, visibility_timeout_s=4, max_in_flight=2048) as client:
            jobs = [client.submit(x[i]) for i in range(len(x))]
            wait_results(jobs, 100)
            wait_for(hang_model.started, 60, "job 300's device call to start")
            first.kill()  # SIGKILL
            assert not jobs[-1].done()
            # Messages the dead worker had reserved: only late acknowledgement
            # and the visibility timeout bring these back (the producer's own
            # recovery leaves jobs that are in this index alone).
            assert aof_redis.client().hlen("unacked") > 0
            hang_model.gate.unlink()
            replacement.start().wait_ready()
            assert_all_correct(jobs, x, path)


@pytest.mark.slow
def test_sigterm_finishes_in_flight_work_requeues_the_rest_and_exits_in_bounded_time(
    aof_redis: RedisServer, mlp_path: str
) -> None:
    # A one-hour visibility timeout: anything the second worker finishes was
    # handed back at shutdown, not recovered by a timeout.
    env = {"PREDICTQ_VISIBILITY_TIMEOUT_S": "3600", "PREDICTQ_SHUTDOWN_TIMEOUT_S": "20"}
    first = worker_on(aof_redis, mlp_path, concurrency=16, name="leaver", env=env).start()
    second = worker_on(aof_redis, mlp_path, concurrency=8, name="stayer", env=env)
    try:
        first.wait_ready()
        x = inputs(1500, seed=1)
        with client_on(aof_redis) as client:
            jobs = [client.submit(x[i]) for i in range(len(x))]
            wait_results(jobs, 100)
            started = time.monotonic()
            exit_code = first.terminate(timeout_s=60)
            assert time.monotonic() - started < 30
            assert exit_code == 0
            # Nothing left reserved: running jobs were acknowledged, reserved
            # ones handed back to the queue, none left for the visibility timeout.
            assert aof_redis.client().hlen("unacked") == 0
            assert "Warm shutdown" in first.log() or "worker: Warm shutdown" in first.log()
            second.start().wait_ready()
            assert_all_correct(jobs, x, mlp_path)
    finally:
        first.stop()
        second.stop()


@pytest.mark.slow
def test_redis_restart_mid_run_every_submitted_job_completes(
    aof_redis: RedisServer, mlp_path: str
) -> None:
    env = {"PREDICTQ_VISIBILITY_TIMEOUT_S": "5"}
    worker = worker_on(aof_redis, mlp_path, concurrency=8, name="survivor", env=env).start()
    try:
        worker.wait_ready()
        x = inputs(600, seed=2)
        jobs: list[Job] = []
        halfway = threading.Event()
        with client_on(aof_redis, submit_timeout_s=60, visibility_timeout_s=5) as client:

            def submitter() -> None:
                for i in range(len(x)):
                    jobs.append(client.submit(x[i]))
                    if i == 200:
                        halfway.set()

            with ThreadPoolExecutor(1) as pool:
                done = pool.submit(submitter)
                assert halfway.wait(60)
                aof_redis.restart()  # workers and producer must reconnect by themselves
                done.result(timeout=120)  # every submit returned (retried through the outage)
            assert len(jobs) == len(x)
            assert_all_correct(jobs, x, mlp_path)
        assert worker.process is not None and worker.process.poll() is None
    finally:
        worker.stop()


class _LogSeen(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


@pytest.mark.slow
def test_a_submit_made_during_a_redis_outage_waits_it_out_and_its_job_completes(
    aof_redis: RedisServer, mlp_path: str
) -> None:
    env = {"PREDICTQ_VISIBILITY_TIMEOUT_S": "5"}
    worker = worker_on(aof_redis, mlp_path, concurrency=4, name="patient", env=env).start()
    retrying = _LogSeen("broker unavailable")
    producer_log = logging.getLogger("producer.sender")
    producer_log.addHandler(retrying)
    try:
        worker.wait_ready()
        x = inputs(2, seed=4)
        with client_on(aof_redis, submit_timeout_s=60, visibility_timeout_s=5) as client:
            assert_all_correct([client.submit(x[0])], x[:1], mlp_path)  # connected and served
            aof_redis.stop()
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(client.submit, x[1])
                assert retrying.event.wait(30), "the submit did not meet the outage"
                assert not pending.done()
                aof_redis.start()
                job = pending.result(timeout=90)
            assert_all_correct([job], x[1:], mlp_path)
    finally:
        producer_log.removeHandler(retrying)
        worker.stop()


@pytest.mark.parametrize("queue_cap", [None, 1000], ids=["uncapped", "capped-queue"])
def test_a_connected_client_gets_broker_unavailable_once_an_outage_outlasts_its_deadline(
    aof_redis: RedisServer, queue_cap: int | None
) -> None:
    with client_on(aof_redis, submit_timeout_s=2, max_queue_length=queue_cap) as client:
        assert client.queue_length() == 0  # connected
        aof_redis.stop()
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"within 2s .*PREDICTQ_SUBMIT_TIMEOUT_S"):
            client.submit(np.zeros((1, F), np.float32))
        # It retried for the whole deadline (the queue-length check too), then gave up.
        assert 2 <= time.monotonic() - started < 20


def test_submit_with_redis_down_raises_broker_unavailable_in_bounded_time() -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    with PredictionClient(
        broker_url=dead + "/0", result_backend=dead + "/1", submit_timeout_s=1
    ) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"within 1s .*PREDICTQ_SUBMIT_TIMEOUT_S"):
            client.submit(np.zeros((1, F), np.float32))
        assert time.monotonic() - started < 15


@pytest.mark.slow
def test_a_poison_job_runs_at_most_max_deliveries_times_then_fails_and_others_complete(
    aof_redis: RedisServer, tmp_path: Path
) -> None:
    path = models.build_poison_model(str(tmp_path / "poison.keras"))
    with (
        PoisonedWorker(aof_redis, path) as poisoned,
        client_on(aof_redis, visibility_timeout_s=2) as client,
    ):
        x = inputs(20, seed=3)
        poison = np.full((1, F), POISON, np.float32)
        innocent = [client.submit(x[i]) for i in range(10)]
        bad = client.submit(poison)
        innocent += [client.submit(x[i]) for i in range(10, 20)]
        assert poisoned.until_done(bad) == 2
        with pytest.raises(PoisonJob, match=r"ran 2 time\(s\) and its worker process died"):
            bad.get(timeout=10)
        assert_all_correct(innocent, x, path)


@pytest.mark.parametrize("backend", backends.ALL)
def test_device_oom_splits_batches_and_a_job_that_never_fits_fails_alone(
    redis_server: RedisServer, tmp_path: Path, backend: str
) -> None:
    # Each backend's own out-of-memory error (JAX: a real failed allocation).
    path = models.build_oom_model(str(tmp_path / "oom.keras"), max_rows=8)
    # Batches of up to 32 rows are formed; the model only fits 8 at a time.
    env = {
        "PREDICTQ_MAX_BATCH_SIZE": "32",
        "PREDICTQ_BATCH_WAIT_MS": "50",
        "PREDICTQ_MODEL_IMPORTS": "tests.support.layers",
        "PREDICTQ_KERAS_BACKEND": backend,
    }
    worker = WorkerProcess(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        model_path=path,
        queue=f"oom-{backend}",
        concurrency=16,
        name=f"oom-{backend}",
        env=env,
    ).start()
    try:
        worker.wait_ready()
        x = np.random.default_rng(4).random((40, F), dtype=np.float32)
        # One sample of 9 x F numbers: more than fit at once (8 x F).
        huge = np.random.default_rng(5).random((1, 9 * F), dtype=np.float32)
        with PredictionClient(
            broker_url=redis_server.url(0),
            result_backend=redis_server.url(1),
            queue=f"oom-{backend}",
        ) as client:
            big = client.submit(x[:20])  # one job, more rows than fit at once
            doomed = client.submit(huge)
            singles = [client.submit(x[i : i + 1]) for i in range(20, 40)]
            with pytest.raises(DeviceOutOfMemory, match="does not fit in device memory"):
                doomed.get(timeout=60)
            # (The reference runs in pieces of 8 rows: the model's own limit.)
            expected = np.concatenate(
                [models.reference(path, x[i : i + 8]) for i in range(0, 40, 8)]
            )
            assert np.allclose(big.get(timeout=60), expected[:20], atol=1e-5)
            for i, job in enumerate(singles, start=20):
                assert np.allclose(job.get(timeout=60), expected[i : i + 1], atol=1e-5)
    finally:
        worker.stop()


def test_deadlines_backpressure_and_queue_cap(aof_redis: RedisServer, mlp_path: str) -> None:
    x = inputs(5, seed=6)
    with client_on(aof_redis, max_queue_length=3, max_in_flight=5, submit_timeout_s=0.2) as c:
        expired = c.submit(x[0], deadline_s=0.001)
        queued = [c.submit(x[i]) for i in (1, 2)]
        assert c.queue_length() == 3
        with pytest.raises(QueueFull, match=r"expected fewer than 3 waiting jobs .* found 3"):
            c.submit(x[3])
        assert c.queue_length() == 3  # nothing was added
    with client_on(aof_redis, max_in_flight=2, submit_timeout_s=0.2) as c:
        held = [c.submit(x[i]) for i in (3, 4)]
        with pytest.raises(TooManyInFlight, match="expected at most 2 unfinished jobs"):
            c.submit(x[0])
        # A job the broker loses (a worker died between popping its message and
        # recording it as reserved) is published again by its producer.
        with client_on(aof_redis, visibility_timeout_s=1) as lossy:
            lost = lossy.submit(x[2])
            popped = aof_redis.client().lpop("predictq")  # the newest message: `lost`
            assert popped is not None and lost.id.encode() in popped
            worker = worker_on(aof_redis, mlp_path, concurrency=4, name="late").start()
            try:
                worker.wait_ready()
                assert_all_correct([lost], x[2:3], mlp_path)
                assert lossy._recovery.republished == 1
            except BaseException:
                worker.stop()
                raise
        try:
            with client_on(aof_redis) as reader:
                with pytest.raises(DeadlineExceeded, match="deadline passed"):
                    reader.job(expired.id).get(timeout=60)
                rest = [reader.job(j.id) for j in queued]
                assert_all_correct(rest, x[1:3], mlp_path)
            assert_all_correct(held, x[3:5], mlp_path)
            # With results in, the in-flight slots are free again.
            assert c.submit(x[0]).get(timeout=60).shape == (1, 4)
        finally:
            worker.stop()

"""Soak: 20,000 jobs through two workers while one is killed and Redis restarts."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import psutil
import pytest

from predictq_ops.redis_server import RedisServer
from producer import Job, PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess

F = models.FEATURES
JOBS = 20_000
PRODUCERS = 4


@pytest.fixture()
def aof_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


def rss_mb(worker: WorkerProcess) -> float:
    return psutil.Process(worker.pid).memory_info().rss / 2**20


@pytest.mark.slow
def test_20k_jobs_survive_a_worker_kill_and_a_redis_restart_with_bounded_memory(
    aof_redis: RedisServer, mlp_path: str, record_property: object
) -> None:
    env = {"PREDICTQ_VISIBILITY_TIMEOUT_S": "5"}

    def start(name: str) -> WorkerProcess:
        return WorkerProcess(
            broker_url=aof_redis.url(0),
            result_backend=aof_redis.url(1),
            model_path=mlp_path,
            concurrency=16,
            name=name,
            env=env,
        ).start()

    steady, victim = start("steady"), start("victim")
    replacement: WorkerProcess | None = None
    try:
        steady.wait_ready()
        victim.wait_ready()
        x = np.random.default_rng(7).random((JOBS, 1, F), dtype=np.float32)
        expected = models.reference(mlp_path, x.reshape(-1, F))
        jobs: list[Job | None] = [None] * JOBS
        # Warm the workers up before the first memory reading.
        with PredictionClient(
            broker_url=aof_redis.url(0),
            result_backend=aof_redis.url(1),
            visibility_timeout_s=5,
            submit_timeout_s=90,
            max_in_flight=4000,
            result_timeout_s=300,
        ) as client:
            for job in [client.submit(x[i]) for i in range(200)]:
                job.get()
            steady_start = rss_mb(steady)

            def producer(p: int) -> None:
                for i in range(p, JOBS, PRODUCERS):
                    jobs[i] = client.submit(x[i])

            threads = [threading.Thread(target=producer, args=(p,)) for p in range(PRODUCERS)]
            for t in threads:
                t.start()

            def done_by(i: int) -> None:
                """Wait until job i has been submitted, then for its result."""
                while jobs[i] is None:
                    threads[i % PRODUCERS].join(0.05)
                jobs[i].get()  # type: ignore[union-attr]

            done_by(JOBS // 4)
            victim.kill()
            replacement = start("replacement")
            done_by(JOBS // 2)
            aof_redis.restart()
            replacement.wait_ready()
            replacement_start = rss_mb(replacement)
            for t in threads:
                t.join()
            correct = sum(
                bool(np.allclose(job.get(), expected[i : i + 1], atol=1e-5))  # type: ignore[union-attr]
                for i, job in enumerate(jobs)
            )
            steady_end, replacement_end = rss_mb(steady), rss_mb(replacement)
            republished = client._recovery.republished
        report = (
            f"correct {correct}/{JOBS}; RSS steady {steady_start:.0f}->{steady_end:.0f} MB, "
            f"replacement {replacement_start:.0f}->{replacement_end:.0f} MB; "
            f"republished by the producer: {republished}"
        )
        print(report)
        record_property("soak", report)  # type: ignore[operator]
        assert correct == JOBS
        assert steady_end < steady_start + 200, report
        assert replacement_end < replacement_start + 200, report
        assert steady.process is not None and steady.process.poll() is None
    finally:
        steady.stop()
        victim.stop()
        if replacement is not None:
            replacement.stop()

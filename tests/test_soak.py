"""Soak: 20,000 jobs through two workers while one is killed and Redis restarts."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from predictq_ops.redis_server import RedisServer
from producer import Job, PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess

F = models.FEATURES
JOBS = 20_000
PRODUCERS = 4
#: The last jobs, submitted only once the replacement worker serves: its share of
#: them is what its memory is measured over, however long it took to start.
HELD_BACK = 6_000


@pytest.fixture()
def aof_redis() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@dataclass(frozen=True)
class Reading:
    """A worker's resident memory and the jobs it had finished, read together."""

    rss_bytes: int
    served: int

    @classmethod
    def of(cls, worker: WorkerProcess) -> Reading:
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            families = text_string_to_metric_families(r.read().decode())
        served = sum(
            s.value for f in families for s in f.samples if s.name == "predictq_jobs_total"
        )
        return cls(psutil.Process(worker.pid).memory_info().rss, int(served))

    def growth_per_job(self, later: Reading) -> float:
        """Bytes of RSS growth per job finished between this reading and ``later``."""
        assert later.served > self.served + 1000, (self, later)  # enough jobs to measure
        return (later.rss_bytes - self.rss_bytes) / (later.served - self.served)


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

            release = threading.Event()

            def producer(p: int) -> None:
                for i in range(p, JOBS, PRODUCERS):
                    if i >= JOBS - HELD_BACK:
                        release.wait()
                    jobs[i] = client.submit(x[i])

            threads = [threading.Thread(target=producer, args=(p,)) for p in range(PRODUCERS)]
            for t in threads:
                t.start()

            def done_by(i: int) -> None:
                """Wait until job i has been submitted, then for its result."""
                while jobs[i] is None:
                    threads[i % PRODUCERS].join(0.05)
                jobs[i].get()  # type: ignore[union-attr]

            try:
                done_by(JOBS // 4)
                steady_from = Reading.of(steady)  # warm: a few thousand jobs served
                victim.kill()
                replacement = start("replacement")
                done_by(JOBS // 2)
                aof_redis.restart()
                replacement.wait_ready()
                replacement_from = Reading.of(replacement)  # warm: it served since the kill
            finally:
                release.set()
            for t in threads:
                t.join()
            correct = sum(
                bool(np.allclose(job.get(), expected[i : i + 1], atol=1e-5))  # type: ignore[union-attr]
                for i, job in enumerate(jobs)
            )
            steady_to, replacement_to = Reading.of(steady), Reading.of(replacement)
            steady_growth = steady_from.growth_per_job(steady_to)
            replacement_growth = replacement_from.growth_per_job(replacement_to)
            republished = client._recovery.republished
        report = (
            f"correct {correct}/{JOBS}; RSS growth per job: steady {steady_growth:.0f} B, "
            f"replacement {replacement_growth:.0f} B (over {steady_to.served - steady_from.served} "
            f"and {replacement_to.served - replacement_from.served} jobs); "
            f"republished by the producer: {republished}"
        )
        print(report)
        record_property("soak", report)  # type: ignore[operator]
        assert correct == JOBS
        # Growth per job after warm-up, over the thousands of jobs each worker served since
        # (about 9,000 and 5,000). Seen: under 0.7 KB per job, mostly one-off steps (Redis
        # reconnections, allocator arenas). 3 KB leaves that noise a 4x margin, and a leak
        # of 10 KB per job exceeds it threefold.
        assert steady_growth < 3072, report
        assert replacement_growth < 3072, report
        assert steady.process is not None and steady.process.poll() is None
    finally:
        steady.stop()
        victim.stop()
        if replacement is not None:
            replacement.stop()

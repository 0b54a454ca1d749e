"""Workers and clients on one private redis-server, and single-sample jobs to check.

Shared by the fault and lifecycle tests, which each start their own Redis.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Final

import numpy as np

from predictq.errors import PredictqError, ResultTimeout
from predictq_ops.redis_server import RedisServer
from producer import Job, PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess

F = models.FEATURES
#: The exit code of a worker the poison layer killed (tests/support/layers.py).
POISON_EXIT: Final = 17


def worker_on(server: RedisServer, model_path: str, **kw: Any) -> WorkerProcess:
    """A (not yet started) worker on ``server``: broker db 0, results db 1."""
    return WorkerProcess(
        broker_url=server.url(0), result_backend=server.url(1), model_path=model_path, **kw
    )


def client_on(server: RedisServer, **kw: Any) -> PredictionClient:
    """A producer on ``server``; keyword arguments override settings."""
    kw.setdefault("result_timeout_s", 180)
    return PredictionClient(broker_url=server.url(0), result_backend=server.url(1), **kw)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    """``n`` single-sample jobs' inputs, shape (n, 1, FEATURES)."""
    return np.random.default_rng(seed).random((n, 1, F), dtype=np.float32)


def assert_all_correct(jobs: list[Job], x: np.ndarray, model_path: str) -> None:
    """Each job's result equals the in-process model's output for its own input."""
    expected = models.reference(model_path, x.reshape(-1, F))
    for i, job in enumerate(jobs):
        out = job.get(timeout=180)
        assert np.allclose(out, expected[i : i + 1], atol=1e-5), f"job {i} got another's result"


def wait_dead_or_done(worker: WorkerProcess, job: Job, timeout_s: float = 120) -> str:
    """Block until the worker process exits ("dead") or the job has its outcome ("done")."""
    give_up = time.monotonic() + timeout_s
    assert worker.process is not None
    while time.monotonic() < give_up:
        if worker.process.poll() is not None:
            return "dead"
        try:
            job.raw_result(timeout=0.2)
            return "done"
        except ResultTimeout:
            continue
        except PredictqError:
            return "done"
    raise AssertionError("neither the worker died nor the job finished")


class PoisonedWorker:
    """A worker serving a poison model (tests/support/models.py), restarted each time it dies.

    Redelivery after 2 s, a job given up after 2 deaths (``PREDICTQ_MAX_DELIVERIES``).
    """

    ENV: Final = {
        "PREDICTQ_VISIBILITY_TIMEOUT_S": "2",
        "PREDICTQ_MAX_DELIVERIES": "2",
        "PREDICTQ_MODEL_IMPORTS": "tests.support.layers",
    }

    def __init__(self, server: RedisServer, model_path: str) -> None:
        self._server = server
        self._path = model_path
        self.deaths = 0
        self.worker = self._started()

    def _started(self) -> WorkerProcess:
        worker = worker_on(self._server, self._path, concurrency=8, name="poisoned", env=self.ENV)
        try:
            worker.start().wait_ready()
        except AssertionError:
            # A restarted worker consumes the redelivered messages as soon as it
            # is ready, and the poison job can kill it before its readiness
            # record is seen (measured: 15 ms after "ready"): a death like any
            # other, which until_done counts. Exit 17 comes only from the poison
            # layer, so the model had loaded and a job ran.
            if worker.process is not None and worker.process.poll() == POISON_EXIT:
                return worker
            worker.stop()
            raise
        except BaseException:
            worker.stop()
            raise
        return worker

    def until_done(self, job: Job) -> int:
        """Restart the worker each time it dies until ``job`` has its outcome; the deaths."""
        while wait_dead_or_done(self.worker, job) == "dead":
            assert self.worker.process is not None
            assert self.worker.process.returncode == POISON_EXIT
            self.deaths += 1
            assert self.deaths <= 2, "the poison job ran more than PREDICTQ_MAX_DELIVERIES times"
            self.worker = self._started()
        return self.deaths

    def __enter__(self) -> PoisonedWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.stop()


@contextlib.contextmanager
def victim_and_heir(
    server: RedisServer,
    model_path: str,
    *,
    visibility_timeout_s: int,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    """A ready worker to kill, and one (not started) to take over after; both stopped at the end."""
    env = {**(env or {}), "PREDICTQ_VISIBILITY_TIMEOUT_S": str(visibility_timeout_s)}
    victim = worker_on(server, model_path, concurrency=8, name="victim", env=env).start()
    heir = worker_on(server, model_path, concurrency=8, name="heir", env=env)
    try:
        victim.wait_ready()
        yield victim, heir
    finally:
        victim.stop()
        heir.stop()

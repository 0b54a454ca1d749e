"""One job through Runtime.predict: its Redis round trips happen on its own thread.

Unit tests with a fake model and a real batcher; the attempt counts against a
real redis-server (tests/test_faults.py shows poison jobs with real workers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from predictq.errors import PoisonJob, PredictionError, Requeue
from predictq.redis_client import client_from_url
from predictq.settings import Settings
from predictq_ops.redis_server import RedisServer, free_port
from workers import deliveries
from workers.batcher import Batcher
from workers.deliveries import DeliveryTracker
from workers.registry import ModelRegistry, ServedVersion
from workers.runtime import JobContext, Runtime
from workers.spec import ModelSpec, TensorSpec

Array = np.ndarray[Any, Any]
F32 = np.dtype("float32")
SPEC = ModelSpec(
    path="fake.keras",
    format="keras",
    inputs=(TensorSpec("x", (None, 3), F32),),
    outputs=(TensorSpec("y", (None, 3), F32),),
    input_structure="single",
    output_structure="single",
)
FAIL = -1.0


class FakeModel:
    """Doubles its input; raises on a FAIL sample; can hold its calls on ``gate``."""

    spec = SPEC

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, inputs: list[Array]) -> list[Array]:
        self.entered.set()
        self.gate.wait(10)
        if (inputs[0][:, 0] == FAIL).any():
            raise ValueError("a FAIL sample")
        return [inputs[0] * 2]


class RecordingDeliveries:
    """Stands in for DeliveryTracker: records calls; ``release`` holds counts (a slow Redis)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.counting: dict[str, threading.Event] = {}
        self.release = threading.Event()
        self.release.set()

    def count_attempt(self, task_id: str) -> None:
        self.calls.append(("count", task_id))
        self.counting.setdefault(task_id, threading.Event()).set()
        self.release.wait(10)

    def survived(self, task_id: str) -> None:
        self.calls.append(("survived", task_id))

    def counted(self, task_id: str) -> threading.Event:
        return self.counting.setdefault(task_id, threading.Event())


@pytest.fixture()
def model() -> FakeModel:
    return FakeModel()


@pytest.fixture()
def tracker() -> RecordingDeliveries:
    return RecordingDeliveries()


@pytest.fixture()
def runtime(model: FakeModel, tracker: RecordingDeliveries) -> Iterator[Runtime]:
    batcher = Batcher(max_batch_size=8, batch_wait_ms=1)
    batcher.start()
    broker = client_from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    registry = ModelRegistry()
    registry.add(ServedVersion("default", 1, model, stamp=None))  # type: ignore[arg-type]
    yield Runtime(
        registry,
        batcher,
        settings=Settings.from_env({}),
        broker=broker,
        deliveries=tracker,  # type: ignore[arg-type]
    )
    batcher.close(5)
    broker.close()


def job(task_id: str, *, redelivered: bool = False) -> JobContext:
    return JobContext(task_id=task_id, redelivered=redelivered, deadline=None)


def x(value: float) -> Array:
    return np.full((1, 3), value, np.float32)


def test_a_slow_attempt_count_delays_only_its_own_job(
    runtime: Runtime, tracker: RecordingDeliveries
) -> None:
    tracker.release.clear()  # Redis answers the count only when released
    with ThreadPoolExecutor(2) as pool:
        suspect = pool.submit(runtime.predict, x(1), job("suspect", redelivered=True))
        assert tracker.counted("suspect").wait(5)
        # Were the count made on the device thread, this job would wait for it too.
        fresh = pool.submit(runtime.predict, x(2), job("fresh"))
        assert np.array_equal(fresh.result(5).outputs, x(4))  # type: ignore[arg-type]
        assert not suspect.done()
        tracker.release.set()
        assert np.array_equal(suspect.result(5).outputs, x(2))  # type: ignore[arg-type]


def test_redelivered_jobs_are_counted_one_at_a_time_and_cleared_once_their_result_is_back(
    runtime: Runtime, model: FakeModel, tracker: RecordingDeliveries
) -> None:
    model.gate.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(runtime.predict, x(1), job("a", redelivered=True))
        assert model.entered.wait(5)  # "a" is in its device call
        second = pool.submit(runtime.predict, x(FAIL), job("b", redelivered=True))
        # "b" waits its turn uncounted: if this process died now, only "a" ran.
        assert not tracker.counted("b").wait(0.3)
        model.gate.set()
        first.result(5)
        with pytest.raises(PredictionError, match="a FAIL sample"):
            second.result(5)
    # A job that failed also survived: its count is cleared too.
    assert tracker.calls == [("count", "a"), ("survived", "a"), ("count", "b"), ("survived", "b")]


def test_an_input_that_cannot_be_read_from_redis_goes_back_to_the_queue(
    runtime: Runtime,
) -> None:
    reference = {"__payload__": "predictq:payload:by-ref"}
    with pytest.raises(Requeue, match="cannot read the job's input from Redis"):
        runtime.predict(reference, job("by-ref"))


def test_attempts_are_counted_until_max_deliveries_then_the_job_is_a_poison_job(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    tracker = DeliveryTracker(client, max_deliveries=3, ttl_s=60)
    tracker.count_attempt("attempts-t1")  # attempt 2 (the first delivery is not counted)
    tracker.count_attempt("attempts-t1")  # attempt 3
    with pytest.raises(PoisonJob, match=r"ran 3 time\(s\) .*PREDICTQ_MAX_DELIVERIES=3"):
        tracker.count_attempt("attempts-t1")
    tracker.count_attempt("attempts-t2")
    tracker.survived("attempts-t2")  # its result came back: it is not to blame
    tracker.count_attempt("attempts-t2")
    tracker.count_attempt("attempts-t2")


def test_counting_with_redis_unreachable_hands_the_job_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deliveries, "REDIS_PATIENCE_S", 0.3)
    dead = client_from_url(f"redis://127.0.0.1:{free_port()}/1")
    tracker = DeliveryTracker(dead, max_deliveries=3, ttl_s=60)
    with pytest.raises(Requeue, match="cannot count the job's attempts"):
        tracker.count_attempt("t3")
    dead.close()

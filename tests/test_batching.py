"""The batcher's invariants, shown by a real threads-pool worker and a real model.

tests/test_batcher.py proves each invariant on the batcher alone, with fakes;
here a worker process runs a Keras model that misbehaves on marked samples, on
each installed Keras backend, and every output is compared with the model run in
this process (TensorFlow).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from predictq.errors import PredictionError
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import backends, models
from tests.support.layers import FAIL, SHORT
from tests.support.processes import WorkerProcess

F = models.FEATURES


@pytest.fixture(scope="module")
def misbehaving_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return models.build_misbehaving_model(str(tmp_path_factory.mktemp("m") / "misbehaving.keras"))


@pytest.fixture(scope="module", params=backends.ALL)
def backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on each installed Keras backend."""
    return str(request.param)


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisServer, misbehaving_path: str, backend: str
) -> Iterator[WorkerProcess]:
    w = WorkerProcess(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        model_path=misbehaving_path,
        concurrency=16,
        queue=f"misbehaving-{backend}",
        name=f"misbehaving-{backend}",
        env={
            "PREDICTQ_MODEL_IMPORTS": "tests.support.layers",
            "PREDICTQ_MAX_BATCH_SIZE": "64",
            "PREDICTQ_KERAS_BACKEND": backend,
        },
    ).start()
    try:
        w.wait_ready()
        yield w
    finally:
        w.stop()


@pytest.fixture()
def client(
    redis_server: RedisServer, worker: WorkerProcess, backend: str
) -> Iterator[PredictionClient]:
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue=f"misbehaving-{backend}",
        result_timeout_s=60,
    ) as c:
        yield c


def metric(worker: WorkerProcess, name: str, **labels: str) -> float:
    """The sum of the /metrics samples called ``name`` whose labels include ``labels``
    (every model version's, for the per-model metrics)."""
    url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    if not found:
        raise AssertionError(f"{name} {labels} not in /metrics")
    return sum(found)


#: How each backend reports the FAIL sample's error.
FAILED = {
    "tensorflow": "InvalidArgumentError.*a FAIL sample",
    "jax": "INTERNAL: CpuCallback error.*ValueError: a FAIL sample",
    "torch": "ValueError: a FAIL sample",
}


def test_a_job_that_makes_the_model_raise_fails_alone_and_its_neighbours_get_their_outputs(
    client: PredictionClient, worker: WorkerProcess, backend: str, misbehaving_path: str
) -> None:
    assert_breaks_its_batch_alone(client, worker, misbehaving_path, FAIL, FAILED[backend])


# A compiled JAX program's output shape is fixed by its input's, so a model
# cannot return a row too few there: this case runs on the other backends.
@pytest.mark.parametrize("backend", ["tensorflow", "torch"], indirect=True)
def test_a_job_whose_output_is_a_row_short_fails_alone_and_its_neighbours_get_theirs(
    client: PredictionClient, worker: WorkerProcess, backend: str, misbehaving_path: str
) -> None:
    assert_breaks_its_batch_alone(
        client, worker, misbehaving_path, SHORT, "model output 0 has 0 rows for a batch of 1"
    )


def assert_breaks_its_batch_alone(
    client: PredictionClient,
    worker: WorkerProcess,
    misbehaving_path: str,
    marker: float,
    message: str,
) -> None:
    """The bad job fails alone, having shared a device call; its neighbours succeed."""
    rng = np.random.default_rng(int(marker))
    bad = np.full((1, F), marker, np.float32)
    isolated_before = metric(worker, "predictq_batches_isolated_total")
    # Bursts of concurrent jobs, until the bad one has shared a device call at
    # least once (a burst on a busy 2-core machine can be served one by one).
    for _ in range(10):
        x = rng.random((15, 1, F), dtype=np.float32)
        with ThreadPoolExecutor(16) as pool:
            jobs = list(pool.map(client.submit, [*x[:8], bad, *x[8:]]))
        bad_job = jobs.pop(8)
        expected = models.reference(misbehaving_path, x.reshape(-1, F))
        for i, job in enumerate(jobs):
            assert np.allclose(job.get(timeout=60), expected[i : i + 1], atol=1e-5)
        with pytest.raises(PredictionError, match=message) as failed:
            bad_job.get(timeout=60)
        # The model's own words, not TensorFlow's trace-time stack of file paths.
        assert len(str(failed.value)) < 600 and "File " not in str(failed.value)
        if metric(worker, "predictq_batches_isolated_total") > isolated_before:
            break
    else:
        pytest.fail("in 10 bursts the bad job never shared a device call")


def test_a_job_larger_than_max_batch_size_runs_in_device_sized_pieces_in_order(
    client: PredictionClient, worker: WorkerProcess, misbehaving_path: str
) -> None:
    x = np.random.default_rng(5).random((1000, F), dtype=np.float32)
    calls_before = metric(worker, "predictq_batch_size_samples_count")
    fitting_before = metric(worker, "predictq_batch_size_samples_bucket", le="64.0")
    out = client.predict(x, timeout=60)
    assert np.allclose(out, models.reference(misbehaving_path, x), atol=1e-5)
    calls = metric(worker, "predictq_batch_size_samples_count") - calls_before
    fitting = metric(worker, "predictq_batch_size_samples_bucket", le="64.0") - fitting_before
    assert calls >= 1000 / 64 and fitting == calls  # every device call held <= 64 samples


def test_the_worker_serves_on_after_failing_jobs(
    client: PredictionClient, backend: str, misbehaving_path: str, tmp_path: Path
) -> None:
    x = np.random.default_rng(6).random((3, F), dtype=np.float32)
    for marker in (FAIL,) if backend == "jax" else (FAIL, SHORT):
        with pytest.raises(PredictionError):
            client.predict(np.full((2, F), marker, np.float32), timeout=60)
        assert np.allclose(
            client.predict(x, timeout=60), models.reference(misbehaving_path, x), atol=1e-5
        )

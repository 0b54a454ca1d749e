"""Fixtures: a throwaway redis-server, tiny real Keras models, real worker processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from predictq.kombu_layout import UNACKED_KEY, queue_keys
from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import backends, models
from tests.support.backends import Served
from tests.support.processes import WorkerProcess


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free port for the whole session (system binary or bundled)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A redis-server of the test module's own (its keys and queues touch no other module)."""
    with RedisServer() as s:
        yield s


@pytest.fixture()
def queue(server: RedisServer) -> Iterator[str]:
    """A queue name of this test alone; its kombu lists and the unacked hash go afterwards."""
    name = f"q-{uuid.uuid4().hex[:8]}"
    yield name
    with server.client() as r:
        r.delete(*queue_keys(name), UNACKED_KEY)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_path(model_dir: Path) -> str:
    """A small real MLP (16 features -> 4 classes) saved as .keras."""
    return models.build_mlp(str(model_dir / "mlp.keras"))


@pytest.fixture()
def hang_model(tmp_path: Path) -> Iterator[models.HangModel]:
    """The MLP with a gate (models.build_hang_model), its gate file in place."""
    gate = tmp_path / "gate"
    gate.touch()
    yield models.HangModel(
        gate, models.build_hang_model(str(tmp_path / "hang.keras"), gate=str(gate))
    )
    gate.unlink(missing_ok=True)  # releases a call still blocked in a worker being stopped


@pytest.fixture(scope="session")
def mlp_worker(redis_server: RedisServer, mlp_path: str) -> Iterator[WorkerProcess]:
    """A real threads-pool worker (concurrency 16) serving the MLP, shared by many tests."""
    worker = WorkerProcess(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        model_path=mlp_path,
        pool="threads",
        concurrency=16,
        queue="mlp",
        name="mlp",
        env={
            "PREDICTQ_MAX_BATCH_SIZE": "64",
            "PREDICTQ_MAX_JOB_SAMPLES": "5000",
            "PREDICTQ_MAX_PAYLOAD_BYTES": str(1024 * 1024),
        },
    ).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


@pytest.fixture()
def client(redis_server: RedisServer, mlp_worker: WorkerProcess) -> Iterator[PredictionClient]:
    """A producer talking to the shared MLP worker."""
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue="mlp",
        result_timeout_s=60,
    ) as c:
        yield c


@pytest.fixture(scope="module", params=backends.ALL)
def served(
    request: pytest.FixtureRequest, redis_server: RedisServer, mlp_path: str
) -> Iterator[Served]:
    """The MLP served on each installed backend (TensorFlow: the shared ``mlp_worker``).

    Module-scoped: a JAX or PyTorch worker lives only while its module's tests run,
    so no other test sees its readiness record in the shared Redis.
    """
    backend: str = request.param
    if backend == "tensorflow":
        yield Served(backend, "mlp", request.getfixturevalue("mlp_worker"))
        return
    worker = WorkerProcess(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        model_path=mlp_path,
        concurrency=16,
        queue=f"mlp-{backend}",
        name=f"mlp-{backend}",
        env={
            "PREDICTQ_KERAS_BACKEND": backend,
            "PREDICTQ_MAX_BATCH_SIZE": "64",
            "PREDICTQ_MAX_JOB_SAMPLES": "5000",
        },
    ).start()
    try:
        worker.wait_ready()
        yield Served(backend, f"mlp-{backend}", worker)
    finally:
        worker.stop()


@pytest.fixture()
def served_client(redis_server: RedisServer, served: Served) -> Iterator[PredictionClient]:
    """A producer talking to ``served``'s worker."""
    with PredictionClient(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        queue=served.queue,
        result_timeout_s=60,
    ) as c:
        yield c

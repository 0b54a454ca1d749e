"""One model load per worker process in every supported pool, and multi-input models end to end."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest

from predictq_ops.redis_server import RedisServer
from producer import PredictionClient
from tests.support import models
from tests.support.processes import WorkerProcess, is_dead


@pytest.fixture()
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def run_jobs(client: PredictionClient, make_input: object, jobs: int, threads: int) -> list[object]:
    def one(i: int) -> object:
        return client.predict(make_input(i), timeout=120)  # type: ignore[operator]

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(jobs)))


def model_loads(port: int) -> float:
    """``predictq_model_loads_total`` read from one worker process's own /metrics
    (summed over model versions: the process serves one model, one version)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        loads = [
            float(line.split()[-1])
            for line in r.read().decode().splitlines()
            if line.startswith("predictq_model_loads_total{")
        ]
    if not loads:
        raise AssertionError(f"no predictq_model_loads_total on port {port}")
    return sum(loads)


def test_solo_pool_loads_once_and_serves_a_multi_input_multi_output_model(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    path = models.build_multi_io(str(tmp_path / "multi.keras"), dict_io=True)
    worker = WorkerProcess(
        broker_url=private_redis.url(0),
        result_backend=private_redis.url(1),
        model_path=path,
        pool="solo",
        name="solo",
    ).start()
    try:
        (record,) = worker.wait_ready()
        rng = np.random.default_rng(0)
        a = rng.random((100, 4, 6), dtype=np.float32)
        b = rng.random((100, 4, 3, 2), dtype=np.float32)
        with PredictionClient(
            broker_url=private_redis.url(0), result_backend=private_redis.url(1)
        ) as client:
            outs = run_jobs(client, lambda i: {"a": a[i], "b": b[i]}, 100, 8)
            as_list = client.predict([a[0], b[0]], timeout=60)
        for i, out in enumerate(outs):
            ref = models.reference(path, {"a": a[i], "b": b[i]})
            assert set(out) == {"score", "klass"}  # type: ignore[arg-type]
            for k in ref:
                assert np.allclose(out[k], ref[k], atol=1e-5)  # type: ignore[index]
        assert np.allclose(as_list["klass"], outs[0]["klass"], atol=1e-6)  # type: ignore[index]
        assert record["pid"] == worker.pid and record["pool"] == "solo"
        assert [r["loads"] for r in worker.records()] == [1]
        assert model_loads(worker.metrics_port) == 1  # after 101 jobs, still one load
    finally:
        worker.stop()


def test_prefork_pool_loads_once_per_child_and_never_in_the_parent(
    private_redis: RedisServer, tmp_path: Path
) -> None:
    path = models.export_savedmodel(str(tmp_path / "savedmodel"))
    worker = WorkerProcess(
        broker_url=private_redis.url(0),
        result_backend=private_redis.url(1),
        model_path=path,
        pool="prefork",
        concurrency=2,
        name="prefork",
    ).start()
    try:
        worker.wait_ready(processes=2)
        x = np.random.default_rng(1).random((100, 3, models.FEATURES), dtype=np.float32)
        with PredictionClient(
            broker_url=private_redis.url(0), result_backend=private_redis.url(1)
        ) as client:
            outs = run_jobs(client, lambda i: x[i], 100, 8)
        import tensorflow as tf

        signature = tf.saved_model.load(path).signatures["serving_default"]
        for i, out in enumerate(outs):
            expected = next(iter(signature(x=x[i]).values())).numpy()
            assert np.allclose(out, expected, atol=1e-5)  # type: ignore[arg-type]
        records = worker.records()
        children = {p.pid for p in psutil.Process(worker.pid).children()}
        assert len(records) == 2
        assert {r["pid"] for r in records} == children
        assert worker.pid not in {r["pid"] for r in records}
        assert all(r["loads"] == 1 and r["pool"] == "prefork" for r in records)
        # After 100 jobs, each child's own counter: still one load (children
        # serve metrics on the base port + their index, 0 and 1).
        assert sorted(r["metrics_port"] for r in records) == [
            worker.metrics_port,
            worker.metrics_port + 1,
        ]
        assert [model_loads(r["metrics_port"]) for r in records] == [1, 1]
        # The parent never imported TensorFlow (it is not fork-safe).
        parent_maps = Path(f"/proc/{worker.pid}/maps").read_text()
        assert "libtensorflow" not in parent_maps
        # The worker leads a process group of its own, with its children, so that kill()
        # reaches them without relying on Celery's PDEATHSIG.
        group = worker.group()
        assert {p.pid for p in group} == children | {worker.pid}
        worker.kill()
        assert all(is_dead(p) for p in group)
    finally:
        worker.stop()

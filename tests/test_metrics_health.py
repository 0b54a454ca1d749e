"""Operations against real processes: the worker metrics endpoint, health and readiness."""

from __future__ import annotations

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from predictq.errors import InvalidInput
from predictq_ops.redis_server import RedisServer, free_port
from producer import PredictionClient
from tests.support import models
from tests.support.ops import clean_env, http_get, run_cli
from tests.support.processes import WorkerProcess, wait_for

F = models.FEATURES


# --- helpers -------------------------------------------------------------------------------


def metric_samples(port: int) -> list[Sample]:
    """Every sample on a worker's real Prometheus endpoint."""
    _status, text = http_get(f"http://127.0.0.1:{port}/metrics")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def sample_values(samples: list[Sample], name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``."""
    return [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def listening_on(pid: int, port: int) -> set[str]:
    """The addresses process ``pid`` accepts TCP connections on at ``port``."""
    return {
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


# --- worker metrics ------------------------------------------------------------------------


def test_metrics_listen_on_every_interface_by_default_and_where_the_setting_says(
    redis_server: RedisServer, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    # The default: what a Prometheus in another container needs.
    assert listening_on(mlp_worker.pid, mlp_worker.metrics_port) == {"0.0.0.0"}
    worker = WorkerProcess(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        model_path=mlp_path,
        queue="metrics-address",
        concurrency=2,
        env={"PREDICTQ_METRICS_ADDRESS": "127.0.0.1"},
    ).start()
    try:
        worker.wait_ready()
        assert listening_on(worker.pid, worker.metrics_port) == {"127.0.0.1"}
        assert metric_samples(worker.metrics_port)  # and it serves there
    finally:
        worker.stop()


def test_the_worker_metrics_endpoint_counts_jobs_batches_waits_and_the_model(
    client: PredictionClient, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    x = np.random.default_rng(10).random((5, F), dtype=np.float32)
    jobs = [client.submit(x[i : i + 1]) for i in range(5)]
    for i, job in enumerate(jobs):
        assert np.allclose(job.get(timeout=60), models.reference(mlp_path, x[i : i + 1]), atol=1e-5)
    with pytest.raises(InvalidInput):
        client.predict(np.ones((1, F + 3), np.float32), timeout=60)

    # The counters move right after the result is stored: poll the real endpoint briefly.
    def counted() -> list[Sample] | None:
        samples = metric_samples(mlp_worker.metrics_port)
        failures = sample_values(samples, "predictq_jobs_total", error_type="InvalidInput")
        successes = sample_values(samples, "predictq_jobs_total", outcome="success")
        return samples if sum(failures) >= 1 and sum(successes) >= 5 else None

    samples = wait_for(counted, 30, "the jobs to be counted in /metrics")
    assert sample_values(
        samples, "predictq_jobs_total", outcome="failure", error_type="InvalidInput"
    )
    assert sum(sample_values(samples, "predictq_batch_size_samples_count")) > 0
    assert sum(sample_values(samples, "predictq_batch_size_samples_sum")) >= 5
    assert sum(sample_values(samples, "predictq_queue_wait_seconds_count")) >= 6
    assert sum(sample_values(samples, "predictq_device_seconds_count")) > 0
    assert sum(sample_values(samples, "predictq_device_seconds_sum")) > 0
    [load_s] = sample_values(samples, "predictq_model_load_seconds")
    assert 0 < load_s < 300
    [info] = [s for s in samples if s.name == "predictq_model_info"]
    assert info.labels["path"] == mlp_path
    assert info.labels["inputs"] == f"x: float32 [None, {F}]"
    assert info.value == 1
    assert sample_values(samples, "predictq_model_loads_total") == [1.0]
    assert sample_values(samples, "predictq_model_ready") == [1.0]


# --- health --------------------------------------------------------------------------------


def test_health_any_is_healthy_while_a_worker_is_ready(
    redis_server: RedisServer, mlp_worker: WorkerProcess
) -> None:
    out = run_cli(
        "health", "--any", "--verbose", env=clean_env(PREDICTQ_RESULT_BACKEND=redis_server.url(1))
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("healthy: ")
    assert "mlp@" in out.stdout and f"pid {mlp_worker.pid}" in out.stdout


def test_health_counts_a_worker_on_this_host(
    redis_server: RedisServer, mlp_worker: WorkerProcess
) -> None:
    out = run_cli("health", env=clean_env(PREDICTQ_RESULT_BACKEND=redis_server.url(1)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("healthy: ")


def test_health_is_unhealthy_against_a_redis_without_workers() -> None:
    with RedisServer() as empty:
        for args in (("health",), ("health", "--any")):
            out = run_cli(*args, env=clean_env(PREDICTQ_RESULT_BACKEND=empty.url(1)))
            assert out.returncode == 1, (args, out.stdout, out.stderr)
            assert "unhealthy" in out.stderr
            assert "healthy" not in out.stdout


def test_health_is_unhealthy_in_one_line_when_redis_is_unreachable() -> None:
    nowhere = f"redis://:secret-pw@127.0.0.1:{free_port()}/1"
    out = run_cli("health", env=clean_env(PREDICTQ_RESULT_BACKEND=nowhere), timeout_s=60)
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("predictq: error: "), out.stderr
    assert "secret-pw" not in out.stdout + out.stderr
    assert "healthy" not in out.stdout


def test_a_gracefully_stopped_worker_withdraws_its_readiness_record(mlp_path: str) -> None:
    with RedisServer(password="health-pw") as server:
        worker = WorkerProcess(
            broker_url=server.url(0),
            result_backend=server.url(1),
            model_path=mlp_path,
            queue="health",
            concurrency=2,
        ).start()
        env = clean_env(PREDICTQ_RESULT_BACKEND=server.url(1))
        try:
            worker.wait_ready()
            assert run_cli("health", env=env).returncode == 0
            assert worker.terminate() == 0
            assert worker.records() == []
            out = run_cli("health", "--any", env=env)
            assert out.returncode == 1 and "unhealthy" in out.stderr
        finally:
            worker.stop()

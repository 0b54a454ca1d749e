"""A worker that cannot serve stops, visibly, and hands its jobs on.

A model that does not load, a device thread that dies, a device call that hangs
through a shutdown: each must end the worker process with a non-zero exit code
(not leave it requeueing jobs forever, or waiting forever), withdraw its
readiness, and lose no job. Real redis-server and worker processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from predictq.errors import PoisonJob, PredictionError
from predictq.readiness import read_records
from predictq_ops.redis_server import RedisServer, free_port
from tests.support import models
from tests.support.cluster import (
    assert_all_correct,
    client_on,
    inputs,
    wait_dead_or_done,
    worker_on,
)
from tests.support.crash import CRASH
from tests.support.layers import HANG
from tests.support.processes import ROOT, base_env, wait_for
from workers.exitcodes import EX_CONFIG, EX_SOFTWARE

F = models.FEATURES


@pytest.fixture()
def private_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


#: Short timeouts, so that a hung worker's job comes back within seconds.
HANG_ENV = {
    **models.HANG_IMPORTS,
    "PREDICTQ_SHUTDOWN_TIMEOUT_S": "3",
    "PREDICTQ_VISIBILITY_TIMEOUT_S": "3",
}


def ready_records(server: RedisServer) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(server.url(1), socket_timeout=5)  # the result backend
    try:
        return read_records(client)
    finally:
        client.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_model_that_cannot_load_stops_the_worker_and_its_jobs_wait_for_a_good_one(
    private_redis: RedisServer, tmp_path: Path, mlp_path: str, pool: str
) -> None:
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"this is not a Keras archive")
    x = inputs(3)
    with client_on(private_redis) as client:
        jobs = [client.submit(x[i]) for i in range(3)]
        bad = worker_on(private_redis, str(broken), pool=pool, concurrency=2, name="broken")
        good = worker_on(private_redis, mlp_path, concurrency=4, name="good")
        try:
            bad.start()
            assert bad.process is not None
            # Before the fix this worker ran on, requeueing every job it took.
            assert bad.process.wait(120) == EX_CONFIG
            log = bad.log()
            assert "worker cannot serve, stopping: ModelLoadError" in log
            assert str(broken) in log
            assert ready_records(private_redis) == []
            assert client.queue_length() == 3, "a job was taken by a worker that cannot serve"
            good.start().wait_ready()
            assert_all_correct(jobs, x, mlp_path)
        finally:
            bad.stop()
            good.stop()


def test_plain_celery_worker_without_a_model_exits_with_one_clear_error(
    private_redis: RedisServer,
) -> None:
    env = base_env(
        PREDICTQ_BROKER_URL=private_redis.url(0), PREDICTQ_RESULT_BACKEND=private_redis.url(1)
    )
    argv = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--pool", "threads"]
    done = subprocess.run(
        [*argv, "-c", "2", "--without-mingle", "--without-gossip"],
        check=False,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "PREDICTQ_MODEL_PATH must name the model to serve" in done.stdout + done.stderr


def test_a_dead_device_thread_fails_its_job_withdraws_readiness_and_stops_the_worker(
    private_redis: RedisServer, mlp_path: str
) -> None:
    env = {"PREDICTQ_MODEL_IMPORTS": "tests.support.crash", "PREDICTQ_VISIBILITY_TIMEOUT_S": "3"}
    crashing = worker_on(private_redis, mlp_path, concurrency=4, name="crashing", env=env)
    heir = worker_on(private_redis, mlp_path, concurrency=4, name="heir")
    x = inputs(6, seed=1)
    try:
        crashing.start().wait_ready()
        assert crashing.process is not None
        assert len(ready_records(private_redis)) == 1
        with client_on(private_redis, visibility_timeout_s=3) as client:
            assert_all_correct([client.submit(x[0])], x[:1], mlp_path)
            with pytest.raises(PredictionError, match="the device thread crashed"):
                client.predict(np.full((1, F), CRASH, np.float32), timeout=60)
            # Sent while the worker is stopping: it may take some, and must hand them back.
            later = [client.submit(x[i]) for i in range(1, 6)]
            assert crashing.process.wait(60) == EX_SOFTWARE
            assert "worker process" in crashing.log() and "stops" in crashing.log()
            assert ready_records(private_redis) == []
            heir.start().wait_ready()
            assert_all_correct(later, x[1:], mlp_path)
    finally:
        crashing.stop()
        heir.stop()


def test_jobs_queued_behind_a_crashing_device_call_go_back_to_the_queue_at_once(
    private_redis: RedisServer, mlp_path: str, tmp_path: Path
) -> None:
    started = tmp_path / "crash-started"
    env = {
        "PREDICTQ_MODEL_IMPORTS": "tests.support.crash",
        "TESTS_CRASH_MARK": str(started),
        "TESTS_CRASH_BEHIND": "4",  # the call crashes once 4 jobs wait behind it
        # An hour: a job that completes was handed back at the crash, not
        # recovered by the visibility timeout (or republished by its producer).
        "PREDICTQ_VISIBILITY_TIMEOUT_S": "3600",
    }
    crashing = worker_on(private_redis, mlp_path, concurrency=8, name="crashing", env=env)
    heir = worker_on(private_redis, mlp_path, concurrency=8, name="heir")
    x = inputs(4, seed=2)
    try:
        crashing.start().wait_ready()
        assert crashing.process is not None
        with client_on(private_redis, visibility_timeout_s=3600) as client:
            doomed = client.submit(np.full((1, F), CRASH, np.float32))
            wait_for(started.exists, 60, "the crashing device call to start")
            queued = [client.submit(x[i]) for i in range(4)]
            with pytest.raises(PredictionError, match="the device thread crashed"):
                doomed.get(timeout=60)
            assert crashing.process.wait(60) == EX_SOFTWARE
            assert private_redis.client().hlen("unacked") == 0  # none left reserved
            heir.start().wait_ready()
            # They did nothing wrong: each one runs again, not PredictionError.
            assert_all_correct(queued, x, mlp_path)
    finally:
        crashing.stop()
        heir.stop()


def test_a_hung_device_call_cannot_keep_a_stopping_worker_alive_and_its_job_is_redelivered(
    private_redis: RedisServer, hang_model: models.HangModel
) -> None:
    path = hang_model.path
    hung = worker_on(private_redis, path, concurrency=4, name="hung", env=HANG_ENV)
    heir = worker_on(private_redis, path, concurrency=4, name="heir", env=HANG_ENV)
    stuck = np.full((1, F), HANG, np.float32)
    try:
        hung.start().wait_ready()
        assert hung.process is not None
        with client_on(private_redis, visibility_timeout_s=3) as client:
            job = client.submit(stuck)
            wait_for(hang_model.started, 60, "the device call to start")
            signalled = time.monotonic()
            hung.process.send_signal(signal.SIGTERM)
            # Without the shutdown deadline this wait times out: Celery's threads
            # pool waits for the running job forever.
            assert hung.process.wait(60) == EX_SOFTWARE
            assert time.monotonic() - signalled < 30
            assert "shutdown did not finish within 3s" in hung.log()
            hang_model.gate.unlink()  # the device is "fixed": the redelivered job can run
            heir.start().wait_ready()
            assert np.allclose(job.get(timeout=120), models.reference(path, stuck), atol=1e-5)
    finally:
        hung.stop()
        heir.stop()


def test_a_device_call_that_hangs_stops_the_worker_by_itself_and_its_job_is_redelivered(
    private_redis: RedisServer, hang_model: models.HangModel
) -> None:
    path = hang_model.path
    env = {**HANG_ENV, "PREDICTQ_DEVICE_TIMEOUT_S": "2"}
    hung = worker_on(private_redis, path, concurrency=4, name="wedged", env=env)
    heir = worker_on(private_redis, path, concurrency=4, name="heir", env=env)
    stuck = np.full((1, F), HANG, np.float32)
    try:
        hung.start().wait_ready()
        assert hung.process is not None
        with client_on(private_redis, visibility_timeout_s=3) as client:
            job = client.submit(stuck)
            wait_for(hang_model.started, 60, "the device call to start")
            # No signal from outside: the worker notices the hang and stops.
            assert hung.process.wait(60) == EX_SOFTWARE
            assert "over PREDICTQ_DEVICE_TIMEOUT_S=2: the device is hung" in hung.log()
            assert ready_records(private_redis) == []
            hang_model.gate.unlink()
            heir.start().wait_ready()
            assert np.allclose(job.get(timeout=120), models.reference(path, stuck), atol=1e-5)
    finally:
        hung.stop()
        heir.stop()


@pytest.mark.slow
def test_a_job_that_hangs_the_device_every_time_ends_as_a_poison_job(
    private_redis: RedisServer, hang_model: models.HangModel
) -> None:
    path = hang_model.path  # its gate is never released: every attempt hangs
    env = {
        **HANG_ENV,
        "PREDICTQ_DEVICE_TIMEOUT_S": "1",
        "PREDICTQ_SHUTDOWN_TIMEOUT_S": "2",
        "PREDICTQ_VISIBILITY_TIMEOUT_S": "2",
        "PREDICTQ_MAX_DELIVERIES": "2",
    }
    worker = worker_on(private_redis, path, concurrency=4, name="wedged", env=env).start()
    stops = 0
    try:
        worker.wait_ready()
        with client_on(private_redis, visibility_timeout_s=2) as client:
            job = client.submit(np.full((1, F), HANG, np.float32))
            while wait_dead_or_done(worker, job) == "dead":
                assert worker.process is not None
                assert worker.process.returncode == EX_SOFTWARE
                stops += 1
                assert stops <= 2, "the hanging job was run more than PREDICTQ_MAX_DELIVERIES times"
                worker = worker_on(private_redis, path, concurrency=4, name="wedged", env=env)
                worker.start().wait_ready()
            with pytest.raises(PoisonJob, match=r"ran 2 time\(s\) .*PREDICTQ_MAX_DELIVERIES=2"):
                job.get(timeout=10)
            assert stops == 2
            assert np.allclose(  # the worker that gave it up serves on
                client.predict(np.zeros((1, F), np.float32), timeout=60),
                models.reference(path, np.zeros((1, F), np.float32)),
                atol=1e-5,
            )
    finally:
        worker.stop()


#: Runs start_serving (and, if it started, stop_serving) in a fresh process and
#: prints what is left running: threads, the metrics port, Redis connections.
SERVE_PROBE = """
import json, os, socket, sys, threading, time
import redis
from prometheus_client import REGISTRY
from workers import lifecycle

def left(check_redis):
    port = int(os.environ["PREDICTQ_METRICS_PORT"])
    with socket.socket() as s:
        metrics_open = s.connect_ex(("127.0.0.1", port)) == 0
    clients = None
    if check_redis:
        probe = redis.Redis.from_url(os.environ["PREDICTQ_RESULT_BACKEND"])
        for _ in range(40):  # the server notices a closed connection a moment later
            clients = len(probe.client_list()) - 1  # not this probe's own connection
            if clients == 0:
                break
            time.sleep(0.05)
        probe.close()
    return {
        "threads": sorted(t.name for t in threading.enumerate() if t.name.startswith("predictq")),
        "metrics_open": metrics_open,
        "model_ready": REGISTRY.get_sample_value("predictq_model_ready"),
        "readiness": lifecycle.current_readiness() is not None,
        "redis_clients": clients,
    }

try:
    lifecycle.start_serving(nodename="probe@test", index=0)
except SystemExit as e:
    print(json.dumps({"exit": e.code, "after": left(False)}))
    sys.exit(0)
serving = left(True)
lifecycle.stop_serving()
print(json.dumps({"exit": None, "serving": serving, "after": left(True)}))
"""


def probe_serving(**env: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", SERVE_PROBE],
        env=base_env(PREDICTQ_METRICS_PORT=str(free_port()), **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


NOTHING_LEFT = {
    "threads": [],
    "metrics_open": False,
    "model_ready": 0.0,
    "readiness": False,
}


def test_stop_serving_releases_everything_start_serving_took(
    private_redis: RedisServer, mlp_path: str
) -> None:
    seen = probe_serving(
        PREDICTQ_MODEL_PATH=mlp_path,
        PREDICTQ_BROKER_URL=private_redis.url(0),
        PREDICTQ_RESULT_BACKEND=private_redis.url(1),
    )
    serving = seen["serving"]
    assert {"predictq-device", "predictq-device-watch", "predictq-readiness"} <= set(
        serving["threads"]
    )
    assert serving["metrics_open"] and serving["readiness"] and serving["model_ready"] == 1.0
    assert serving["redis_clients"] >= 1
    assert seen["after"] == {**NOTHING_LEFT, "redis_clients": 0}
    assert ready_records(private_redis) == []


def test_a_start_that_fails_half_way_undoes_what_it_started(
    private_redis: RedisServer, mlp_path: str
) -> None:
    # The model loads and the device thread and metrics start; then the
    # readiness record cannot be written: its Redis is not there.
    seen = probe_serving(
        PREDICTQ_MODEL_PATH=mlp_path,
        PREDICTQ_BROKER_URL=private_redis.url(0),
        PREDICTQ_RESULT_BACKEND=f"redis://127.0.0.1:{free_port()}/1",
    )
    assert seen["exit"] == EX_SOFTWARE
    assert seen["after"] == {**NOTHING_LEFT, "redis_clients": None}


def test_pool_kind_names_the_three_pools_and_refuses_any_other() -> None:
    from predictq.errors import ConfigError
    from workers.app import pool_kind

    assert [pool_kind(p) for p in ("threads", "prefork", "solo")] == ["threads", "prefork", "solo"]

    class GreenPool:  # any other pool, e.g. gevent's or a custom one
        pass

    with pytest.raises(ConfigError, match="threads, prefork or solo, got GreenPool"):
        pool_kind(GreenPool)

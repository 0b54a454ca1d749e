"""Operations against real processes: Flower (basic auth, API, metrics, address checks)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from predictq.celeryconf import PREDICT_JOBS_TASK
from predictq_ops.redis_server import RedisServer, free_port
from producer import PredictionClient, wire
from producer.sender import Outgoing
from tests.support import models
from tests.support.flower import FLOWER_PASSWORD, FLOWER_USER, Flower, stop_process
from tests.support.ops import clean_env, http_get
from tests.support.processes import ROOT, WorkerProcess, wait_for

F = models.FEATURES


def flower_env(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return clean_env(
        PREDICTQ_BROKER_URL=redis_server.url(0),
        PREDICTQ_RESULT_BACKEND=redis_server.url(1),
        PREDICTQ_FLOWER_PORT=str(free_port()),
        PREDICTQ_FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}",
        **extra,
    )


@pytest.fixture(scope="module")
def flower(
    redis_server: RedisServer, mlp_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Flower]:
    """`predictq flower` with basic auth, watching the session Redis (and the mlp worker)."""
    log_path = tmp_path_factory.mktemp("flower") / "flower.log"
    server = Flower(
        [sys.executable, "-m", "predictq_ops.cli", "flower"], flower_env(redis_server), log_path
    )
    try:
        server.wait_answering()
        yield server
    finally:
        stop_process(server.process)


def test_flower_api_refuses_missing_or_wrong_credentials(flower: Flower) -> None:
    for path in ("/api/workers", "/api/tasks"):
        assert http_get(flower.url + path)[0] == 401
        assert http_get(flower.url + path, f"{FLOWER_USER}:wrong")[0] == 401
        assert http_get(flower.url + path, f"nobody:{FLOWER_PASSWORD}")[0] == 401
        assert http_get(flower.url + path, f"{FLOWER_USER}:{FLOWER_PASSWORD}")[0] == 200


def test_flower_lists_the_running_worker_to_an_authenticated_user(flower: Flower) -> None:
    def mlp_listed() -> list[str]:
        workers = flower.get("/api/workers?refresh=1")
        return [name for name in workers if name.startswith("mlp@")]

    names = wait_for(mlp_listed, 60, "Flower to list the mlp worker", flower.log)
    assert len(names) == 1


def wait_until_flower_hears_the_worker(flower: Flower) -> None:
    """Task events reach Flower only once its event receiver runs: it has, when it
    has heard the worker's own (heartbeat) events."""

    def worker_heard() -> bool:
        alive: dict[str, bool] = flower.get("/api/workers?status=1")
        return any(name.startswith("mlp@") and up for name, up in alive.items())

    wait_for(worker_heard, 60, "Flower to receive the mlp worker's events", flower.log)


def test_flower_shows_submitted_jobs_as_succeeded_with_their_model_version(
    flower: Flower, client: PredictionClient
) -> None:
    wait_until_flower_hears_the_worker(flower)
    jobs = [client.submit(np.full((2, F), i, np.float32)) for i in range(4)]
    for job in jobs:
        assert job.get(timeout=60).shape == (2, 4)
    ids = {job.id for job in jobs}

    def all_succeeded() -> dict[str, Any] | None:
        tasks: dict[str, Any] = flower.get("/api/tasks")
        seen = {i: tasks[i] for i in ids if i in tasks}
        done = len(seen) == len(ids) and all(t["state"] == "SUCCESS" for t in seen.values())
        return seen if done else None

    seen = wait_for(all_succeeded, 60, "Flower to show the jobs as SUCCESS", flower.log)
    assert {t["name"] for t in seen.values()} == {"predictq.predict"}
    # Each row names the model version that computed it (PREDICTQ_MODEL_PATH: 'default', 1).
    for task in seen.values():
        assert task["result"].startswith("[model 'default' version 1] "), task["result"]


def test_flower_shows_a_coalesced_message_with_its_job_count_and_outcome(
    flower: Flower, client: PredictionClient
) -> None:
    wait_until_flower_hears_the_worker(flower)
    x = wire.normalize(np.full((1, F), 0.25, np.float32))
    ids = [f"flower-carried-{uuid.uuid4()}" for _ in range(3)]
    jobs = [client.job(i) for i in ids]
    client._sender.publish([Outgoing(i, x, None) for i in ids])  # one message, three jobs
    for job in jobs:
        assert job.get(timeout=60).shape == (1, 4)

    def carrier_succeeded() -> dict[str, Any] | None:
        tasks: dict[str, Any] = flower.get("/api/tasks")
        shown = "3 jobs: [3 x array of dtype float32 and shape (1, 16)]"
        return next(
            (
                t
                for t in tasks.values()
                if t["name"] == PREDICT_JOBS_TASK and t["state"] == "SUCCESS" and shown in t["args"]
            ),
            None,
        )

    task = wait_for(carrier_succeeded, 60, "Flower to show the coalesced message", flower.log)
    assert "'jobs': 3" in task["result"] and "'succeeded': 3" in task["result"]
    assert "'models': {'default': [1]}" in task["result"]


def test_flower_serves_prometheus_metrics_which_its_version_leaves_open(
    flower: Flower, client: PredictionClient
) -> None:
    wait_until_flower_hears_the_worker(flower)
    for job in [client.submit(np.full((1, F), 0.5, np.float32)) for _ in range(3)]:
        job.get(timeout=60)

    def events_counted() -> str | None:
        status, body = http_get(flower.url + "/metrics", f"{FLOWER_USER}:{FLOWER_PASSWORD}")
        assert status == 200, body
        return body if "flower_events_total{" in body else None

    body = wait_for(events_counted, 60, "flower_events_total in Flower's /metrics", flower.log)
    families = {f.name for f in text_string_to_metric_families(body)}
    assert "flower_events" in families
    # Flower 2.x serves /metrics (and /healthcheck) without authentication, for
    # scrapers; its API and UI stay behind basic auth (test above).
    status, body = http_get(flower.url + "/metrics")
    assert status == 200 and "flower_events_total" in body


def test_plain_celery_flower_applies_the_predictq_basic_auth_setting(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    env = flower_env(redis_server)
    assert not any(k.startswith("FLOWER_") for k in env)
    server = Flower(
        [sys.executable, "-m", "celery", "-A", "workers", "flower"], env, tmp_path / "flower.log"
    )
    try:
        server.wait_answering()
        assert http_get(server.url + "/api/workers")[0] == 401
        assert http_get(server.url + "/api/workers", f"{FLOWER_USER}:wrong")[0] == 401
        assert http_get(server.url + "/api/workers", f"{FLOWER_USER}:{FLOWER_PASSWORD}")[0] == 200
    finally:
        stop_process(server.process)


PREDICTQ_FLOWER = [sys.executable, "-m", "predictq_ops.cli", "flower"]
CELERY_FLOWER = [sys.executable, "-m", "celery", "-A", "workers", "flower"]


def flower_env_without_auth(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    env = flower_env(redis_server, **extra)
    del env["PREDICTQ_FLOWER_BASIC_AUTH"]
    return env


def listening_addresses(pid: int) -> set[str]:
    """The IP addresses a process accepts TCP connections on."""
    return {
        c.laddr.ip
        for c in psutil.Process(pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }


@pytest.mark.parametrize("argv", [PREDICTQ_FLOWER, CELERY_FLOWER], ids=["predictq", "celery"])
def test_flower_without_basic_auth_listens_on_loopback_only_and_warns_once(
    redis_server: RedisServer, tmp_path: Path, argv: list[str]
) -> None:
    server = Flower(argv, flower_env_without_auth(redis_server), tmp_path / "flower.log")
    try:
        server.wait_answering()
        assert listening_addresses(server.process.pid) == {"127.0.0.1"}
        log = server.log_path.read_text(errors="replace")
        warnings = [line for line in log.splitlines() if "Flower has no basic auth" in line]
        assert len(warnings) == 1, log
        assert warnings[0].endswith("listening on 127.0.0.1 only"), warnings
    finally:
        stop_process(server.process)


@pytest.mark.parametrize(
    ("argv", "address_env"),
    [
        ([*PREDICTQ_FLOWER, "--address=0.0.0.0"], {}),
        ([*CELERY_FLOWER, "--address=::"], {}),
        (CELERY_FLOWER, {"FLOWER_ADDRESS": "192.0.2.1"}),
        (PREDICTQ_FLOWER, {"PREDICTQ_FLOWER_ADDRESS": "192.0.2.1"}),
    ],
    ids=["predictq-argument", "celery-argument", "flower-variable", "predictq-setting"],
)
def test_flower_without_basic_auth_refuses_a_non_loopback_address_in_one_line(
    redis_server: RedisServer, argv: list[str], address_env: dict[str, str]
) -> None:
    env = {**flower_env_without_auth(redis_server), **address_env}
    out = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("predictq: error: ConfigError: Flower without basic auth")
    assert "PREDICTQ_FLOWER_BASIC_AUTH" in lines[0]


def test_flower_with_basic_auth_listens_everywhere_by_default_or_where_the_setting_says(
    flower: Flower, redis_server: RedisServer, tmp_path: Path
) -> None:
    # With authentication, Flower's own default: every interface (a container's port).
    assert listening_addresses(flower.process.pid) & {"0.0.0.0", "::"}
    env = flower_env(redis_server, PREDICTQ_FLOWER_ADDRESS="127.0.0.1")
    server = Flower(CELERY_FLOWER, env, tmp_path / "flower.log")
    try:
        server.wait_answering()
        assert listening_addresses(server.process.pid) == {"127.0.0.1"}
    finally:
        stop_process(server.process)

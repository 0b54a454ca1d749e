"""Security: Redis passwords and TLS end to end, no pickle anywhere, no secret in any log."""

from __future__ import annotations

import base64
import json
import logging
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from predictq.celeryconf import celery_config
from predictq.codec import ACCEPT_CONTENT, RESULT_CONTENT_TYPE
from predictq.settings import Settings
from predictq_ops.redis_server import RedisServer, free_port
from producer import BrokerUnavailable, PredictionClient
from tests.support import models
from tests.support.processes import ROOT, WorkerProcess, base_env, wait_for
from tests.support.tls import make_tls_files

F = models.FEATURES
PICKLE_TYPES = {"pickle", "application/x-python-serialize"}
CONTENT_SETTINGS = (
    "accept_content",
    "result_accept_content",
    "task_serializer",
    "result_serializer",
    "event_serializer",
)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_predicts_correctly(client: PredictionClient, model_path: str, seed: int) -> None:
    x = rng(seed).random((7, F), dtype=np.float32)
    out = client.predict(x, timeout=60)
    assert np.allclose(out, models.reference(model_path, x), atol=1e-5)


def assert_refused_quickly(client: PredictionClient, secret: str) -> BrokerUnavailable:
    """A submit fails with BrokerUnavailable within about its submit timeout, never hangs."""
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as caught:
        client.submit(np.ones((1, F), np.float32))
    elapsed = time.monotonic() - started
    assert client.settings.submit_timeout_s <= elapsed < client.settings.submit_timeout_s + 15
    assert secret not in str(caught.value)
    assert secret not in str(caught.value.__cause__)
    return caught.value


# --- password ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password() -> str:
    return f"pw-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def secure_redis(password: str) -> Iterator[RedisServer]:
    """A private redis-server that requires ``password``."""
    with RedisServer(password=password) as server:
        yield server


@pytest.fixture(scope="module")
def secure_worker(secure_redis: RedisServer, mlp_path: str) -> Iterator[WorkerProcess]:
    """A worker whose broker and backend URLs carry the password."""
    assert secure_redis.password and secure_redis.password in secure_redis.url(0)
    worker = WorkerProcess(
        broker_url=secure_redis.url(0),
        result_backend=secure_redis.url(1),
        model_path=mlp_path,
        queue="secure",
        concurrency=4,
        name="secure",
    ).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.stop()


def test_a_client_with_the_password_predicts_correctly(
    secure_redis: RedisServer, secure_worker: WorkerProcess, mlp_path: str
) -> None:
    with PredictionClient(
        broker_url=secure_redis.url(0), result_backend=secure_redis.url(1), queue="secure"
    ) as client:
        assert_predicts_correctly(client, mlp_path, seed=0)


def test_a_client_with_a_wrong_password_gets_broker_unavailable_without_hanging(
    secure_redis: RedisServer, secure_worker: WorkerProcess, password: str
) -> None:
    wrong = f"redis://:not-{password}@127.0.0.1:{secure_redis.port}"
    with PredictionClient(
        broker_url=wrong + "/0", result_backend=wrong + "/1", queue="secure", submit_timeout_s=2
    ) as client:
        error = assert_refused_quickly(client, password)
    assert "redis://:***@127.0.0.1" in str(error)
    assert error.retryable


def test_the_worker_log_shows_masked_urls_and_never_the_password(
    secure_redis: RedisServer, secure_worker: WorkerProcess, password: str
) -> None:
    log = secure_worker.log()
    assert "secure@" in log and " ready." in log  # the whole start-up, not an empty file
    assert password not in log
    for what, db in (("transport", 0), ("results", 1)):
        masked = f"redis://:**@127.0.0.1:{secure_redis.port}/{db}"
        assert re.search(rf"{what}:\s+{re.escape(masked)}\s", log), (what, log[-3000:])


def test_a_failing_client_never_logs_its_password(
    secure_redis: RedisServer, caplog: pytest.LogCaptureFixture, password: str
) -> None:
    caplog.set_level(logging.DEBUG)
    nobody_there = f"redis://:{password}@127.0.0.1:{free_port()}"
    wrong = f"redis://:{password}-wrong@127.0.0.1:{secure_redis.port}"
    for url in (nobody_there, wrong):
        with PredictionClient(
            broker_url=url + "/0", result_backend=url + "/1", queue="secure", submit_timeout_s=1
        ) as client:
            assert_refused_quickly(client, password)
    retries = [r for r in caplog.records if "broker unavailable" in r.getMessage()]
    assert retries, "the retries are logged"
    assert password not in caplog.text
    assert all(password not in str(r.args) for r in caplog.records)


def http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return e.code


def test_flower_enforces_its_password_but_never_shows_it_on_a_command_line(
    secure_redis: RedisServer, password: str, tmp_path: Path
) -> None:
    flower_password = f"fl-{secrets.token_hex(12)}"
    port = free_port()
    env = base_env(
        PREDICTQ_BROKER_URL=secure_redis.url(0),
        PREDICTQ_RESULT_BACKEND=secure_redis.url(1),
        PREDICTQ_FLOWER_PORT=str(port),
        PREDICTQ_FLOWER_BASIC_AUTH=f"admin:{flower_password}",
    )
    env = {k: v for k, v in env.items() if not k.startswith("FLOWER_")}
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "predictq_ops.cli", "flower"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        assert process.poll() is None, log_path.read_text()
        try:
            return http_status(url + "/healthcheck") == 200
        except OSError:
            return False

    try:
        wait_for(answering, 90, "Flower to answer", log_path.read_text)
        # Any local user can read a command line (ps, /proc/PID/cmdline).
        argv = psutil.Process(process.pid).cmdline()
        assert "flower" in argv
        assert not [a for a in argv if flower_password in a or password in a], argv
        assert http_status(url + "/api/workers") == 401
        assert http_status(url + "/api/workers", "admin:wrong") == 401
        assert http_status(url + "/api/workers", f"admin:{flower_password}") == 200
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
    text = log_path.read_text()
    assert "Visit me at" in text
    assert flower_password not in text and password not in text


# --- TLS -----------------------------------------------------------------------------------


def test_worker_and_client_predict_over_tls_and_plain_connections_are_refused(
    tmp_path: Path, mlp_path: str
) -> None:
    tls_password = f"tls-{secrets.token_hex(12)}"
    with RedisServer(tls=make_tls_files(tmp_path), password=tls_password) as server:
        assert server.url(0).startswith(f"rediss://:{tls_password}@localhost:{server.port}/0?")
        assert "ssl_cert_reqs=required" in server.url(0)
        worker = WorkerProcess(
            broker_url=server.url(0),
            result_backend=server.url(1),
            model_path=mlp_path,
            queue="tls",
            concurrency=4,
            name="tls",
        ).start()
        try:
            worker.wait_ready()
            with PredictionClient(
                broker_url=server.url(0), result_backend=server.url(1), queue="tls"
            ) as client:
                assert_predicts_correctly(client, mlp_path, seed=1)
            plain = f"redis://:{tls_password}@127.0.0.1:{server.port}"
            with PredictionClient(
                broker_url=plain + "/0",
                result_backend=plain + "/1",
                queue="tls",
                submit_timeout_s=2,
            ) as client:
                assert_refused_quickly(client, tls_password)
            log = worker.log()
            assert "tls@" in log and " ready." in log and tls_password not in log
            assert f"Connected to rediss://:**@localhost:{server.port}/0" in log
        finally:
            worker.stop()


# --- serializers ---------------------------------------------------------------------------


def assert_no_pickle(conf: dict[str, object]) -> None:
    # Results are read with predictq's result serializer only (msgpack or JSON).
    for name, expected in (
        ("accept_content", set(ACCEPT_CONTENT)),
        ("result_accept_content", {RESULT_CONTENT_TYPE}),
    ):
        accepted = conf[name]
        assert isinstance(accepted, list) and accepted, (name, accepted)
        assert set(accepted) == expected, (name, accepted)
        assert not PICKLE_TYPES & set(accepted), (name, accepted)
    for name in ("task_serializer", "result_serializer", "event_serializer"):
        assert conf[name] not in PICKLE_TYPES, (name, conf[name])


def test_the_shared_celery_config_never_accepts_pickle() -> None:
    assert_no_pickle(celery_config(Settings.from_env({})))


def test_the_worker_app_never_accepts_pickle() -> None:
    code = (
        "import json, sys\n"
        "from workers import app\n"
        "print(json.dumps({k: app.conf[k] for k in sys.argv[1:]}))\n"
    )
    env = base_env(
        PREDICTQ_BROKER_URL="redis://127.0.0.1:1/0", PREDICTQ_RESULT_BACKEND="redis://127.0.0.1:1/1"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *CONTENT_SETTINGS],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert_no_pickle(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_producer_app_never_accepts_pickle(secure_redis: RedisServer) -> None:
    with PredictionClient(
        broker_url=secure_redis.url(0), result_backend=secure_redis.url(1), queue="secure"
    ) as client:
        conf = client._app.conf
        assert_no_pickle({k: conf[k] for k in CONTENT_SETTINGS})
        # The backend that decodes results refuses pickle too.
        assert not PICKLE_TYPES & set(client._app.backend.accept)

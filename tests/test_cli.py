"""Operations against real processes: CLI commands (info, predict, help) and their error lines."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from predictq_ops.redis_server import RedisServer, free_port
from tests.support import models
from tests.support.ops import clean_env, run_cli
from tests.support.processes import WorkerProcess

F = models.FEATURES


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
    assert "keras backend: tensorflow" in out.stdout
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

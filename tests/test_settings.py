"""Settings: typed, validated, read from the environment only when asked."""

from __future__ import annotations

import re

import pytest

from predictq.errors import ConfigError
from predictq.settings import Settings, mask_url, settings_help


def test_defaults_need_no_environment() -> None:
    s = Settings.from_env({})
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.result_backend == "redis://localhost:6379/1"
    assert s.result_ttl_s == 3600
    assert s.model_path is None and s.allow_nonfinite is False
    # Failure results carry no worker traceback; metrics listen where a container needs.
    assert s.result_tracebacks is False and s.metrics_address == "0.0.0.0"
    assert s.flower_address is None


def test_values_are_parsed_from_predictq_variables() -> None:
    s = Settings.from_env(
        {
            "PREDICTQ_MAX_BATCH_SIZE": "128",
            "PREDICTQ_BATCH_WAIT_MS": "0.5",
            "PREDICTQ_ALLOW_NONFINITE": "yes",
            "PREDICTQ_MODEL_IMPORTS": "a.b, c",
            "PREDICTQ_GPU_MEMORY_LIMIT_MB": "2048",
            "PREDICTQ_DEVICE": "CPU",
            "PREDICTQ_MAX_QUEUE_LENGTH": "none",
            "PREDICTQ_LOG_LEVEL": "debug",
            "PREDICTQ_METRICS_ADDRESS": "::1",
            "PREDICTQ_FLOWER_ADDRESS": "flower.internal",
        }
    )
    assert s.max_batch_size == 128 and s.batch_wait_ms == 0.5
    assert s.allow_nonfinite is True and s.model_imports == ("a.b", "c")
    assert s.gpu_memory_limit_mb == 2048 and s.device == "cpu"
    assert s.max_queue_length is None and s.log_level == "DEBUG"
    assert s.metrics_address == "::1" and s.flower_address == "flower.internal"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PREDICTQ_MAX_BATCH_SIZE": "0"}, "PREDICTQ_MAX_BATCH_SIZE must be integer >= 1, got 0"),
        ({"PREDICTQ_MAX_BATCH_SIZE": "many"}, "PREDICTQ_MAX_BATCH_SIZE must be int, got 'many'"),
        (
            {"PREDICTQ_BATCH_WAIT_MS": "-1"},
            "PREDICTQ_BATCH_WAIT_MS must be milliseconds between 0 and 10000, got -1",
        ),
        ({"PREDICTQ_BATCH_WAIT_MS": "inf"}, "PREDICTQ_BATCH_WAIT_MS must be float, got 'inf'"),
        ({"PREDICTQ_SUBMIT_TIMEOUT_S": "nan"}, "PREDICTQ_SUBMIT_TIMEOUT_S must be float"),
        ({"PREDICTQ_BATCH_WAIT_MS": "1e9"}, "PREDICTQ_BATCH_WAIT_MS must be milliseconds"),
        ({"PREDICTQ_RESULT_TTL_S": "0.5"}, "PREDICTQ_RESULT_TTL_S must be seconds >= 1, got 0.5"),
        ({"PREDICTQ_ALLOW_NONFINITE": "maybe"}, "PREDICTQ_ALLOW_NONFINITE must be bool"),
        ({"PREDICTQ_DEVICE": "tpu"}, "PREDICTQ_DEVICE must be one of auto, cpu, gpu, got 'tpu'"),
        (
            {"PREDICTQ_BROKER_URL": "amqp://guest:secret@h//"},
            "PREDICTQ_BROKER_URL must be a redis://.*got 'amqp://guest:\\*\\*\\*@h//'",
        ),
        ({"PREDICTQ_VISIBILITY_TIMEOUT_S": "0"}, "PREDICTQ_VISIBILITY_TIMEOUT_S must be"),
        ({"PREDICTQ_FLOWER_BASIC_AUTH": "nocolon"}, "PREDICTQ_FLOWER_BASIC_AUTH must be"),
        (
            {"PREDICTQ_METRICS_ADDRESS": "0.0.0.0:9808"},
            "PREDICTQ_METRICS_ADDRESS must be an IP address or host name .*, got '0.0.0.0:9808'",
        ),
        ({"PREDICTQ_FLOWER_ADDRESS": "http://h"}, "PREDICTQ_FLOWER_ADDRESS must be an IP address"),
        (
            {"PREDICTQ_COALESCE_MAX_JOBS": "5000"},
            "PREDICTQ_COALESCE_MAX_JOBS must be an integer between 1 and 4096 .*, got 5000",
        ),
        (
            {"PREDICTQ_COALESCE_MAX_BYTES": "100"},
            "PREDICTQ_COALESCE_MAX_BYTES must be bytes >= 1024, got 100",
        ),
    ],
)
def test_bad_values_raise_config_error_naming_variable_and_value(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_settings_are_frozen_and_replace_revalidates() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.max_batch_size = 3  # type: ignore[misc]
    assert s.replace(max_batch_size=3).max_batch_size == 3
    with pytest.raises(ConfigError):
        s.replace(max_batch_size=0)
    with pytest.raises(ConfigError, match="PREDICTQ_SHUTDOWN_TIMEOUT_S must be a finite number"):
        s.replace(shutdown_timeout_s=float("inf"))


def test_secrets_are_masked_wherever_settings_are_shown() -> None:
    assert mask_url("redis://:hunter2@h:6379/0") == "redis://:***@h:6379/0"
    assert mask_url("rediss://user:hunter2@h:6380/1?x=y") == "rediss://user:***@h:6380/1?x=y"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"
    assert mask_url("redis://h:6379/0?password=hunter2&db=1") == (
        "redis://h:6379/0?password=***&db=1"
    )
    s = Settings.from_env(
        {
            "PREDICTQ_BROKER_URL": "redis://:hunter2@h/0",
            "PREDICTQ_FLOWER_BASIC_AUTH": "admin:hunter2",
        }
    )
    shown = dict(s.public_items())
    assert "hunter2" not in str(shown)
    assert shown["PREDICTQ_FLOWER_BASIC_AUTH"] == "admin:***"


def test_every_setting_has_help_for_the_readme_table() -> None:
    rows = settings_help()
    assert len(rows) == len(Settings.__dataclass_fields__)
    assert all(name.startswith("PREDICTQ_") and text for name, _, text in rows)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_batch_size": 2.5}, "PREDICTQ_MAX_BATCH_SIZE must be an int, got 2.5"),
        ({"task_events": 1}, "PREDICTQ_TASK_EVENTS must be a bool, got 1"),
        ({"metrics_port": "80"}, "PREDICTQ_METRICS_PORT must be an int or unset"),
        ({"device": "tpu"}, "PREDICTQ_DEVICE must be one of 'auto', 'cpu', 'gpu'"),
        ({"model_imports": ["a"]}, "PREDICTQ_MODEL_IMPORTS must be a tuple of strings"),
    ],
)
def test_overrides_are_type_checked(override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env({}, **override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings().replace(**override)


def test_an_integer_for_a_float_setting_becomes_a_float() -> None:
    settings = Settings(visibility_timeout_s=30)
    assert settings.visibility_timeout_s == 30.0
    assert isinstance(settings.visibility_timeout_s, float)


def test_repr_masks_every_password() -> None:
    settings = Settings(
        broker_url="redis://:brokerpw@h:1/0",
        result_backend="rediss://u:backendpw@h:2/1?password=qpw",
        flower_basic_auth="admin:flowerpw",
    )
    shown = repr(settings)
    for secret in ("brokerpw", "backendpw", "qpw", "flowerpw"):
        assert secret not in shown
    assert "max_batch_size=4096" in shown and "redis://:***@h:1/0" in shown

"""One typed, frozen settings object, read from the environment when a process starts.

Nothing here runs at import time: workers build ``Settings.from_env()`` when the
Celery app is configured, producers when a client is created. Every duration and
size carries its unit in its name. Invalid values raise ``ConfigError`` naming
the variable and the bad value.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from predictq import sentinel
from predictq.carrier import MAX_JOBS
from predictq.errors import ConfigError
from predictq.modelref import MODEL_NAME
from predictq.settings_fields import (
    Device,
    KerasBackend,
    LogLevel,
    SettingsFields,
    env_name,
    parse,
)

__all__ = ["Device", "KerasBackend", "LogLevel", "Settings", "mask_url", "settings_help"]


@dataclass(frozen=True, kw_only=True)
class Settings(SettingsFields):
    """Every predictq setting; the environment variable is ``PREDICTQ_<FIELD NAME>``.

    The fields are declared in predictq/settings_fields.py.
    """

    def __post_init__(self) -> None:
        self._check_types()
        self._validate()

    def __repr__(self) -> str:
        # Never print a password: the URLs and Flower credentials are masked.
        masked = dict(self.public_items())
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value is not None:
                value = masked[env_name(f.name)]
            shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    def _check_types(self) -> None:
        """Every field has its declared type (overrides and ``replace`` bypass the parser)."""
        hints = _type_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            hint = hints[f.name]
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # 30 means 30.0 seconds
                continue
            if not _has_type(value, hint):
                raise ConfigError(
                    f"{env_name(f.name)} must be {_type_name(hint)}, got {value!r} "
                    f"({type(value).__name__})"
                )

    def _validate(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float):
                # inf/nan would pass every ">= x" check below and blow up later,
                # deep inside a thread (e.g. Condition.wait(inf) -> OverflowError).
                _require(math.isfinite(value), f.name, value, "a finite number")
        _require(self.max_batch_size >= 1, "max_batch_size", self.max_batch_size, "integer >= 1")
        _require(
            not self.model_path or not self.model_repository,
            "model_repository",
            self.model_repository,
            "unset when PREDICTQ_MODEL_PATH is set (a model path is a repository of one model)",
        )
        for name in self.model_names:
            _require(
                MODEL_NAME.fullmatch(name) is not None,
                "model_names",
                self.model_names,
                "names of letters, digits, '_', '-' and '.', not starting with '.'",
            )
        _require(
            self.model_poll_s == 0 or self.model_poll_s >= 0.1,
            "model_poll_s",
            self.model_poll_s,
            "seconds >= 0.1, or 0 (only on SIGHUP)",
        )
        _require(
            self.model_keep_versions >= 1,
            "model_keep_versions",
            self.model_keep_versions,
            "integer >= 1",
        )
        _require(
            0 <= self.batch_wait_ms <= 10_000,
            "batch_wait_ms",
            self.batch_wait_ms,
            "milliseconds between 0 and 10000",
        )
        _require(
            self.cpu_shards is None or self.cpu_shards >= 1,
            "cpu_shards",
            self.cpu_shards,
            "integer >= 1 (1 = off), or unset",
        )
        _require(
            self.cpu_shard_min_rows >= 1,
            "cpu_shard_min_rows",
            self.cpu_shard_min_rows,
            "integer >= 1",
        )
        _require(
            self.worker_concurrency >= 1,
            "worker_concurrency",
            self.worker_concurrency,
            "integer >= 1",
        )
        _require(
            self.prefetch_multiplier >= 1,
            "prefetch_multiplier",
            self.prefetch_multiplier,
            "integer >= 1",
        )
        _require(self.max_job_samples >= 1, "max_job_samples", self.max_job_samples, ">= 1")
        _require(
            self.max_payload_bytes >= 1024, "max_payload_bytes", self.max_payload_bytes, ">= 1024"
        )
        _require(self.max_json_bytes >= 1024, "max_json_bytes", self.max_json_bytes, ">= 1024")
        _require(self.dead_letter_max >= 1, "dead_letter_max", self.dead_letter_max, ">= 1")
        _require(
            self.dead_letter_max_bytes >= 1024,
            "dead_letter_max_bytes",
            self.dead_letter_max_bytes,
            ">= 1024",
        )
        _require(
            self.inline_payload_bytes >= 0,
            "inline_payload_bytes",
            self.inline_payload_bytes,
            "bytes >= 0",
        )
        _require(
            self.visibility_timeout_s >= 1,
            "visibility_timeout_s",
            self.visibility_timeout_s,
            "seconds >= 1",
        )
        _require(self.max_deliveries >= 1, "max_deliveries", self.max_deliveries, "integer >= 1")
        # Celery stores the expiry as whole seconds, and 0 means "never expires".
        _require(self.result_ttl_s >= 1, "result_ttl_s", self.result_ttl_s, "seconds >= 1")
        _require(self.shutdown_timeout_s > 0, "shutdown_timeout_s", self.shutdown_timeout_s, "> 0")
        _require(self.device_timeout_s >= 1, "device_timeout_s", self.device_timeout_s, ">= 1")
        _require(
            self.submit_timeout_s >= 0, "submit_timeout_s", self.submit_timeout_s, "seconds >= 0"
        )
        _require(
            self.result_timeout_s > 0, "result_timeout_s", self.result_timeout_s, "seconds > 0"
        )
        _require(self.max_in_flight >= 1, "max_in_flight", self.max_in_flight, "integer >= 1")
        _require(
            1 <= self.coalesce_max_jobs <= MAX_JOBS,
            "coalesce_max_jobs",
            self.coalesce_max_jobs,
            f"an integer between 1 and {MAX_JOBS} (what a worker accepts in one message)",
        )
        _require(
            0 <= self.coalesce_max_unanswered <= 4096,
            "coalesce_max_unanswered",
            self.coalesce_max_unanswered,
            "an integer between 0 (auto: one per serving worker process) and 4096",
        )
        _require(
            0 <= self.coalesce_max_hold_ms <= 10_000,
            "coalesce_max_hold_ms",
            self.coalesce_max_hold_ms,
            "milliseconds between 0 (never hold) and 10000",
        )
        _require(
            self.coalesce_max_samples >= 1,
            "coalesce_max_samples",
            self.coalesce_max_samples,
            "integer >= 1",
        )
        _require(
            self.coalesce_max_bytes >= 1024,
            "coalesce_max_bytes",
            self.coalesce_max_bytes,
            "bytes >= 1024",
        )
        _require(
            self.max_queue_length is None or self.max_queue_length >= 1,
            "max_queue_length",
            self.max_queue_length,
            "integer >= 1 or unset",
        )
        _require(
            self.gpu_memory_limit_mb is None or self.gpu_memory_limit_mb >= 64,
            "gpu_memory_limit_mb",
            self.gpu_memory_limit_mb,
            "integer >= 64 or unset",
        )
        for name in ("metrics_port", "flower_port"):
            port = getattr(self, name)
            _require(port is None or 0 <= port <= 65535, name, port, "a TCP port 0-65535")
        for name in ("metrics_address", "flower_address"):
            address = getattr(self, name)
            _require(
                address is None or _is_address(address),
                name,
                address,
                "an IP address or host name (0.0.0.0: every interface)",
            )
        _require(self.readiness_ttl_s >= 2, "readiness_ttl_s", self.readiness_ttl_s, ">= 2")
        _require(bool(self.queue), "queue", self.queue, "a non-empty queue name")
        self._validate_urls()
        if self.flower_basic_auth is not None:
            for pair in self.flower_basic_auth.split(","):
                _require(":" in pair, "flower_basic_auth", "***", "user:password pairs")

    def _validate_urls(self) -> None:
        for url_field in ("broker_url", "result_backend"):
            url = getattr(self, url_field)
            # A sentinel:// entry anywhere makes it a Sentinel URL: mixing is an error.
            if sentinel.is_sentinel_url(url) or "sentinel://" in url.lower():
                sentinel.parse(url, name=env_name(url_field))  # one line on what is wrong
                _require(
                    bool(self.sentinel_master),
                    "sentinel_master",
                    self.sentinel_master,
                    "the master set's name (SENTINEL MONITOR <name> ...) when "
                    f"{env_name(url_field)} is a sentinel:// URL",
                )
                continue
            _require(
                url.startswith(("redis://", "rediss://", "unix://")),
                url_field,
                mask_url(url),
                "a redis://, rediss:// or unix:// URL, or sentinel://host:port;sentinel://...",
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``PREDICTQ_*`` variables, then ``overrides`` (keyword names)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = parse(f, raw.strip())
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def public_items(self) -> list[tuple[str, str]]:
        """(env var, value) pairs with secrets masked, for `predictq info` and logs."""
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("broker_url", "result_backend"):
                shown = mask_url(value)
            elif f.name == "sentinel_password" and value:
                shown = "***"
            elif f.name == "flower_basic_auth" and value:
                shown = ",".join(p.split(":", 1)[0] + ":***" for p in value.split(","))
            elif isinstance(value, tuple):
                shown = ",".join(value)
            else:
                shown = "" if value is None else str(value)
            out.append((env_name(f.name), shown))
        return out


@functools.cache
def _type_hints() -> dict[str, Any]:
    return get_type_hints(Settings)


def _has_type(value: object, hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_has_type(value, arg) for arg in get_args(hint))
    if origin is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(hint)))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(hint))
    if hint is type(None):
        return "unset (None)"
    if origin is tuple:
        return "a tuple of strings"
    return f"{'an' if hint.__name__[0] in 'aeiou' else 'a'} {hint.__name__}"


#: Fields whose values may hold passwords (masked by ``public_items`` and ``repr``).
_SECRET_FIELDS = frozenset(
    {"broker_url", "result_backend", "flower_basic_auth", "sentinel_password"}
)


def settings_help() -> list[tuple[str, str, str]]:
    """(env var, default, help) for every setting: the README's settings table."""
    rows = []
    for f in fields(Settings):
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, tuple):
            default = ",".join(default)
        rows.append((env_name(f.name), "" if default is None else str(default), f.metadata["help"]))
    return rows


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log)."""
    if ";" in url:  # a Sentinel URL: one entry per sentinel
        return ";".join(mask_url(entry) for entry in url.split(";"))
    # redis-py also takes the password as a query parameter.
    url = re.sub(r"([?&]password=)[^&#]*", r"\1***", url)
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0] if ":" in creds else ""
    return f"{scheme}://{user}:***@{host}"


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_HOST_NAME.fullmatch(value))
    return True


_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{env_name(name)} must be {expected}, got {value!r}")

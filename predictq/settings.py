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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from predictq import sentinel
from predictq.carrier import MAX_JOBS
from predictq.errors import ConfigError
from predictq.modelref import MODEL_NAME

ENV_PREFIX = "PREDICTQ_"

Device = Literal["auto", "cpu", "gpu"]
KerasBackend = Literal["tensorflow", "jax", "torch"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

T = TypeVar("T")


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every predictq setting; the environment variable is ``PREDICTQ_<FIELD NAME>``."""

    # --- Connections -------------------------------------------------------
    broker_url: str = field(
        default="redis://localhost:6379/0",
        metadata={
            "help": "Celery broker (Redis) URL; rediss:// for TLS, password in the URL; "
            "sentinel://h1:26379/0;sentinel://h2:26379 for Redis Sentinel."
        },
    )
    result_backend: str = field(
        default="redis://localhost:6379/1",
        metadata={"help": "Redis result backend URL (results are stored here)."},
    )
    sentinel_master: str | None = field(
        default=None,
        metadata={
            "help": "Master set name the sentinels monitor; required when a URL is "
            "sentinel://host:port[/db];sentinel://host2:port... (Redis Sentinel)."
        },
    )
    sentinel_password: str | None = field(
        default=None,
        metadata={
            "help": "Password of the sentinels themselves (the master's goes in the URL); "
            "unset = none."
        },
    )
    queue: str = field(default="predictq", metadata={"help": "Queue the jobs travel through."})

    # --- Model -------------------------------------------------------------
    model_path: str | None = field(
        default=None,
        metadata={
            "help": "One model to serve, named `default`: a .keras file, SavedModel directory or "
            "legacy .h5 (version 1), or a directory of numbered versions (`1/`, `2/`, ...)."
        },
    )
    model_repository: str | None = field(
        default=None,
        metadata={
            "help": "Directory of models to serve, laid out `<name>/<version>/` (instead of "
            "PREDICTQ_MODEL_PATH); every model in it is served."
        },
    )
    model_names: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Comma-separated model names this worker serves; unset = all."},
    )
    model_poll_s: float = field(
        default=10.0,
        metadata={
            "help": "How often workers look for new or removed versions (SIGHUP: at once); "
            "0 = only on SIGHUP."
        },
    )
    model_keep_versions: int = field(
        default=1,
        metadata={
            "help": "Newest versions of each model kept loaded (older ones can still be pinned)."
        },
    )
    model_imports: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Comma-separated modules imported before loading (custom layers)."},
    )
    allow_nonfinite: bool = field(
        default=False, metadata={"help": "Accept NaN/Inf in inputs (rejected by default)."}
    )

    # --- Batching and worker pool ------------------------------------------
    max_batch_size: int = field(
        default=4096, metadata={"help": "Samples per device call; larger jobs are split."}
    )
    batch_wait_ms: float = field(
        default=10.0,
        metadata={
            "help": "Longest wait for more jobs after the first one, only while more are "
            "expected (announced, or arriving faster than this)."
        },
    )
    worker_concurrency: int = field(
        default=64,
        metadata={"help": "Threads per worker process = jobs that can share one batch."},
    )
    prefetch_multiplier: int = field(
        default=1, metadata={"help": "Messages reserved per thread (Celery prefetch)."}
    )
    max_job_samples: int = field(
        default=1_000_000, metadata={"help": "Largest batch (rows) one job may carry."}
    )
    inline_payload_bytes: int = field(
        default=64 * 1024,
        metadata={"help": "Jobs larger than this travel by reference (a Redis key), not inline."},
    )
    max_payload_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata={"help": "Largest encoded job body; larger ones are refused before decoding."},
    )
    max_json_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={
            "help": "Largest JSON job body. JSON is parsed on the worker's one consumer thread "
            "(~30 MB/s of numbers), so this bounds how long one job can hold up the others."
        },
    )

    # --- Reliability -------------------------------------------------------
    visibility_timeout_s: float = field(
        default=3600.0,
        metadata={
            "help": "An unacknowledged job is redelivered after this long: must exceed the "
            "longest queue-plus-run time of a reserved job, and bounds recovery after a crash."
        },
    )
    max_deliveries: int = field(
        default=3, metadata={"help": "Attempts before a job that kills its worker is given up."}
    )
    result_ttl_s: float = field(default=3600.0, metadata={"help": "How long results are kept."})
    result_tracebacks: bool = field(
        default=False,
        metadata={
            "help": "Store the worker's traceback in failed jobs' results. Off: callers get the "
            "error type and message only, and the worker's log keeps the traceback; turn on "
            "only when every client is trusted."
        },
    )
    shutdown_timeout_s: float = field(
        default=30.0, metadata={"help": "Longest graceful shutdown before in-flight work is cut."}
    )
    device_timeout_s: float = field(
        default=300.0,
        metadata={
            "help": "A device call running longer than this is hung: the worker process stops "
            "and its jobs are redelivered."
        },
    )

    dead_letter_max: int = field(
        default=1000,
        metadata={"help": "Refused messages kept in predictq:dead-letters (oldest dropped)."},
    )
    dead_letter_max_bytes: int = field(
        default=64 * 1024,
        metadata={"help": "Characters of one refused message kept; longer ones are truncated."},
    )

    # --- Device -----------------------------------------------------------
    keras_backend: KerasBackend | None = field(
        default=None,
        metadata={
            "help": "Keras backend of the workers: tensorflow, jax or torch; unset = Keras's own "
            "KERAS_BACKEND if set, else tensorflow."
        },
    )
    device: Device = field(default="auto", metadata={"help": "auto, cpu or gpu."})
    gpu_memory_growth: bool = field(
        default=True, metadata={"help": "Grow GPU memory on demand instead of taking it all."}
    )
    gpu_memory_limit_mb: int | None = field(
        default=None, metadata={"help": "Cap this process's GPU memory (MiB); unset = no cap."}
    )
    intra_op_threads: int | None = field(
        default=None, metadata={"help": "TensorFlow intra-op threads (unset = TF default)."}
    )
    inter_op_threads: int | None = field(
        default=None, metadata={"help": "TensorFlow inter-op threads (unset = TF default)."}
    )

    # --- Producer ----------------------------------------------------------
    submit_timeout_s: float = field(
        default=30.0,
        metadata={"help": "How long submit retries an unreachable Redis before BrokerUnavailable."},
    )
    result_timeout_s: float = field(
        default=300.0, metadata={"help": "Default wait for a result in get()/predict()."}
    )
    max_in_flight: int = field(
        default=1024, metadata={"help": "Unfinished jobs one producer may hold."}
    )
    max_queue_length: int | None = field(
        default=None, metadata={"help": "Refuse submits with QueueFull past this queue length."}
    )
    coalesce_max_jobs: int = field(
        default=64,
        metadata={
            "help": "Most jobs of one client sent together in one message (jobs submitted "
            "while its previous message is being sent); 1 = every job in its own message."
        },
    )
    coalesce_max_samples: int = field(
        default=4096, metadata={"help": "Most samples (rows) in one coalesced message."}
    )
    coalesce_max_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata={
            "help": "Most input bytes in one coalesced message (inputs sent by reference "
            "count a few hundred bytes each)."
        },
    )
    coalesce_max_unanswered: int = field(
        default=0,
        metadata={
            "help": "predict()/apredict() jobs wait to share the next message while this many "
            "of the client's messages have no answer yet; 0 = the number of worker processes "
            "serving the queue (read from their readiness records)."
        },
    )
    coalesce_max_hold_ms: float = field(
        default=20.0,
        metadata={
            "help": "Longest a predict()/apredict() job waits for an answer to release it "
            "before it is sent anyway; 0 = never hold."
        },
    )

    # --- Operations --------------------------------------------------------
    metrics_port: int | None = field(
        default=9808, metadata={"help": "Prometheus port of each worker process; unset = off."}
    )
    metrics_address: str = field(
        default="0.0.0.0",
        metadata={
            "help": "Address the metrics server binds: 0.0.0.0 (every interface) lets a "
            "Prometheus in another container scrape it; 127.0.0.1 keeps it on the host; :: for "
            "IPv6."
        },
    )
    readiness_ttl_s: float = field(
        default=30.0, metadata={"help": "Lifetime of a worker's readiness record (heartbeat)."}
    )
    task_events: bool = field(
        default=True, metadata={"help": "Send Celery task events (needed by Flower)."}
    )
    remote_control: bool = field(
        default=True,
        metadata={
            "help": "Answer Celery remote control (inspect, shutdown, pool size) sent through "
            "the broker; off: Flower shows tasks and heartbeats only."
        },
    )
    flower_port: int = field(default=5555, metadata={"help": "Flower HTTP port."})
    flower_address: str | None = field(
        default=None,
        metadata={
            "help": "Address Flower listens on. Unset: every interface with basic auth (what a "
            "container needs), 127.0.0.1 without; any address but loopback needs basic auth."
        },
    )
    flower_basic_auth: str | None = field(
        default=None, metadata={"help": "user:password (comma-separated pairs) for Flower."}
    )
    log_level: LogLevel = field(default="INFO", metadata={"help": "Worker log level."})

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
                value = masked[_env(f.name)]
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
                    f"{_env(f.name)} must be {_type_name(hint)}, got {value!r} "
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
                sentinel.parse(url, name=_env(url_field))  # one line on what is wrong
                _require(
                    bool(self.sentinel_master),
                    "sentinel_master",
                    self.sentinel_master,
                    f"the master set's name (SENTINEL MONITOR <name> ...) when {_env(url_field)} "
                    "is a sentinel:// URL",
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
            raw = env.get(_env(f.name))
            if raw is not None and raw.strip() != "":
                values[f.name] = _parse(f, raw.strip())
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
            out.append((_env(f.name), shown))
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
        rows.append((_env(f.name), "" if default is None else str(default), f.metadata["help"]))
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
        raise ConfigError(f"{_env(name)} must be {expected}, got {value!r}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = _env(f.name)
    optional = "None" in kind
    if optional and raw.lower() in ("none", "off", "unset"):
        return None
    parsers: dict[str, Callable[[str], Any]] = {
        "int": int,
        "float": _parse_float,
        "bool": _parse_bool,
        "tuple[str, ...]": lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
    }
    base = kind.replace(" | None", "")
    choices = {"Device": Device, "LogLevel": LogLevel, "KerasBackend": KerasBackend}
    if base in choices:
        allowed = get_args(choices[base])
        value = raw.upper() if base == "LogLevel" else raw.lower()
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
        return value
    parser = parsers.get(base, str)
    try:
        return parser(raw)
    except ValueError as e:
        raise ConfigError(f"{name} must be {base}, got {raw!r}") from e


def _parse_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _parse_bool(raw: str) -> bool:
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(raw)

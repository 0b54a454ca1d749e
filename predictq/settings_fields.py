"""Every predictq setting: its name, type, default and help, and how its text is parsed.

``predictq.settings.Settings`` adds the rules the values must keep and reading
them from the environment; this module only declares them, so that the
declaration (the longest part) and the rules stay apart.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from predictq.errors import ConfigError

ENV_PREFIX = "PREDICTQ_"

Device = Literal["auto", "cpu", "gpu"]
KerasBackend = Literal["tensorflow", "jax", "torch"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def env_name(name: str) -> str:
    """The environment variable of the setting ``name``: ``PREDICTQ_<NAME>``."""
    return ENV_PREFIX + name.upper()


@dataclass(frozen=True, kw_only=True)
class SettingsFields:
    """Every predictq setting's declaration (``Settings`` is the one to use)."""

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
    gpu_tf32: bool = field(
        default=False,
        metadata={
            "help": "Let float32 matrix products and convolutions on an NVIDIA GPU round their "
            "inputs to TF32 (faster on large models, but a job's outputs then move with the "
            "size of the batch it lands in: up to 4.6e-2 for MobileNetV2 on an H200); off = "
            "full float32 (README, Deployment)."
        },
    )
    intra_op_threads: int | None = field(
        default=None,
        metadata={
            "help": "TensorFlow intra-op threads; unset = 1 on CPU while batches run in parts "
            "(PREDICTQ_CPU_SHARDS), else TF's default, one per core."
        },
    )
    inter_op_threads: int | None = field(
        default=None, metadata={"help": "TensorFlow inter-op threads (unset = TF default)."}
    )
    cpu_shards: int | None = field(
        default=None,
        metadata={
            "help": "On CPU (TensorFlow): a large batch runs as up to this many row parts at "
            "once, each op on one thread; unset = one part per usable core unless "
            "PREDICTQ_INTRA_OP_THREADS is set; 1 = off, TensorFlow's intra-op threads instead "
            "(README, Benchmark)."
        },
    )
    cpu_shard_min_rows: int = field(
        default=32,
        metadata={"help": "The fewest rows in one part of a split CPU batch (smaller run whole)."},
    )
    tf_thread_spinning: bool = field(
        default=True,
        metadata={
            "help": "TensorFlow's thread pools spin-wait for work between ops (TF's default); "
            "false: they sleep, leaving the cores to other work (README, Benchmark)."
        },
    )
    gc_freeze: bool = field(
        default=True,
        metadata={
            "help": "Once the models are loaded (and again after a hot load or release), "
            "move every object to Python's permanent GC generation, so full collections skip "
            "the ~400k objects of TensorFlow and the models (a ~200 ms pause each, measured); "
            "false: CPython's default collection."
        },
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


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse(f: dataclasses.Field[Any], raw: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = env_name(f.name)
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

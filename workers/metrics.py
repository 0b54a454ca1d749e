"""Prometheus metrics of one worker process, served on ``PREDICTQ_METRICS_PORT``.

Prefork children serve on ``port + child index`` (each child is its own process
with its own model); threads and solo workers on ``port`` itself. The server
binds ``PREDICTQ_METRICS_ADDRESS`` (default 0.0.0.0, every interface, so that a
Prometheus in another container can scrape it).
"""

from __future__ import annotations

import logging
from typing import Final
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from predictq.settings import Settings
from workers.batcher import BatchStats
from workers.model import LoadedModel

log = logging.getLogger(__name__)

_LATENCY_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Labels of every per-model metric: the model's name and version.
_MODEL: Final = ("model", "version")

JOBS: Final = Counter(
    "predictq_jobs", "Jobs finished by this worker process.", ["outcome", "error_type"]
)
REFUSED_MESSAGES: Final = Counter(
    "predictq_rejected_messages",
    "Broker messages refused before any task ran, by reason (workers/guard.py).",
    ["reason"],
)
DEAD_LETTERS: Final = Counter(
    "predictq_dead_letters", "Refused messages pushed to the dead-letter list."
)
MESSAGE_JOBS: Final = Histogram(
    "predictq_message_jobs",
    "Jobs carried per broker message: 1 for predictq.predict, n for a coalesced message.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
BATCH_SAMPLES: Final = Histogram(
    "predictq_batch_size_samples", "Samples per device call.", _MODEL, buckets=_BATCH_BUCKETS
)
BATCH_REQUESTS: Final = Histogram(
    "predictq_batch_size_jobs",
    "Jobs (or job pieces) per device call.",
    _MODEL,
    buckets=_BATCH_BUCKETS,
)
BATCHES_ISOLATED: Final = Counter(
    "predictq_batches_isolated",
    "Device calls that failed and were rerun job by job, so only the failing job fails.",
)
DEVICE_SECONDS: Final = Histogram(
    "predictq_device_seconds",
    "Time of one device call (one batch).",
    _MODEL,
    buckets=_LATENCY_BUCKETS_S,
)
BATCH_WAIT_SECONDS: Final = Histogram(
    "predictq_batch_wait_seconds",
    "Time the oldest job of a batch waited in the batcher.",
    _MODEL,
    buckets=_LATENCY_BUCKETS_S,
)
QUEUE_WAIT_SECONDS: Final = Histogram(
    "predictq_queue_wait_seconds",
    "Time from submit (producer clock) to the start of the task.",
    buckets=_LATENCY_BUCKETS_S,
)
MODEL_LOAD_SECONDS: Final = Gauge(
    "predictq_model_load_seconds", "Time to load and warm up a loaded model version.", _MODEL
)
MODEL_LOADS: Final = Counter(
    "predictq_model_loads", "Model version loads in this process (one per version).", _MODEL
)
MODEL_LOAD_FAILURES: Final = Counter(
    "predictq_model_load_failures",
    "Model versions that failed to load or warm up and were skipped.",
    _MODEL,
)
MODEL_READY: Final = Gauge(
    "predictq_model_ready", "1 once the process serves (its models loaded and warm)."
)
GC_FROZEN: Final = Gauge(
    "predictq_gc_frozen_objects",
    "Objects in Python's permanent GC generation, which collections skip (PREDICTQ_GC_FREEZE).",
)
MODEL_INFO: Final = Info("predictq_model", "A loaded model version.", _MODEL)
MODEL_COMPILES: Final = Gauge(
    "predictq_model_compiles",
    "Programs compiled for a loaded version's inference call (one per traced input shape).",
    _MODEL,
)


def record_batch(stats: BatchStats) -> None:
    """Batcher callback: one device call happened."""
    BATCH_SAMPLES.labels(*stats.labels).observe(stats.samples)
    BATCH_REQUESTS.labels(*stats.labels).observe(stats.requests)
    DEVICE_SECONDS.labels(*stats.labels).observe(stats.device_s)
    BATCH_WAIT_SECONDS.labels(*stats.labels).observe(stats.oldest_wait_s)


def record_isolation(_pieces: int) -> None:
    """Batcher callback: a failed batch is rerun one job at a time."""
    BATCHES_ISOLATED.inc()


def record_load(name: str, version: int, load_s: float) -> None:
    """A model version is loaded and warm (before it serves)."""
    MODEL_LOADS.labels(name, str(version)).inc()
    MODEL_LOAD_SECONDS.labels(name, str(version)).set(load_s)


def record_served(name: str, version: int, model: LoadedModel, device: str) -> None:
    """A model version serves: its info and compile count appear."""
    labels = (name, str(version))
    spec = model.spec
    # Read when scraped: a compile after warm-up (a shape no bucket held) shows.
    MODEL_COMPILES.labels(*labels).set_function(lambda: model.compiles)
    MODEL_INFO.labels(*labels).info(
        {
            "path": spec.path,
            "format": spec.format,
            "backend": model.backend,
            "device": device,
            "inputs": "; ".join(s.describe() for s in spec.inputs),
            "outputs": "; ".join(s.describe() for s in spec.outputs),
        }
    )


def record_released(name: str, version: int) -> None:
    """A model version was released: drop its gauges (the compile gauge holds the model)."""
    labels = (name, str(version))
    for gauge in (MODEL_COMPILES, MODEL_INFO, MODEL_LOAD_SECONDS):
        gauge.remove(*labels)  # a no-op if never recorded


def serve_for(settings: Settings, index: int) -> WSGIServer | None:
    """The endpoint ``settings`` ask for (None: metrics off); prefork children add their index."""
    if settings.metrics_port is None:
        return None
    # Port 0 picks a free port; prefork children serve on the port plus their index.
    port = settings.metrics_port + index if settings.metrics_port else 0
    return serve(port, settings.metrics_address)


def serve(port: int, address: str) -> WSGIServer | None:
    """Start the HTTP endpoint; returns its server (see ``stop``), or None if it could not bind.

    A busy port (or an address this host does not have) must not stop a worker
    from serving predictions, so it is logged, not raised.
    """
    try:
        server, _thread = start_http_server(port, addr=address)
    except OSError as e:
        log.error("metrics: cannot listen on %s port %d (%s); metrics are off", address, port, e)
        return None
    host = f"[{address}]" if ":" in address else address
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return server


def stop(server: WSGIServer) -> None:
    """Stop the HTTP endpoint and release its port."""
    server.shutdown()
    server.server_close()

"""The per-process runtime: one model, one batcher, one readiness record.

Lifecycle, in one place: ``start_runtime`` configures the device, loads and
warms the model, starts the device thread, metrics and readiness record;
``stop_runtime`` undoes it in reverse order. Both are called from Celery signal
handlers (workers/signals.py) exactly once per worker process; ``_process.lock``
makes a second call a no-op rather than a second model load.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from predictq import payloads
from predictq.errors import (
    BrokerUnavailable,
    ConfigError,
    ModelNotReady,
    PredictionError,
    PredictqError,
)
from predictq.readiness import ReadinessRecord
from predictq.redis_client import client_from_url
from predictq.settings import Settings
from workers import metrics
from workers.batcher import Batcher
from workers.deliveries import DeliveryTracker
from workers.device import configure_devices
from workers.model import LoadedModel, import_model_modules, load_model
from workers.validation import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What a task knows about its message, beyond the input."""

    task_id: str
    redelivered: bool
    deadline: float | None  # time.monotonic() instant


class Runtime:
    """A loaded model serving predictions through one batcher."""

    def __init__(
        self,
        settings: Settings,
        model: LoadedModel,
        device: str,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.device = device
        self._on_fatal = on_fatal
        self.batcher = Batcher(
            model,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
            on_batch=metrics.record_batch,
            on_crash=self._device_thread_died,
            on_isolate=metrics.record_isolation,
        )
        redis_client = client_from_url(settings.result_backend)
        self.broker = client_from_url(settings.broker_url)
        self.deliveries = DeliveryTracker(
            redis_client, max_deliveries=settings.max_deliveries, ttl_s=settings.result_ttl_s
        )
        self.redis = redis_client
        self.readiness: ReadinessRecord | None = None
        self._stop_watching: Callable[[], None] = lambda: None

    def predict(self, raw: object, job: JobContext) -> object:
        """Validate, batch, run and restructure one job's prediction."""
        spec = self.model.spec
        with self.batcher.announce():
            raw = self._resolve(raw, job.task_id)
            arrays = validate(
                raw,
                spec,
                allow_nonfinite=self.settings.allow_nonfinite,
                max_job_samples=self.settings.max_job_samples,
            )
            if job.redelivered:
                # Its worker may have died running it: isolate it and count the
                # attempt where it would actually run (workers/deliveries.py).
                self.deliveries.check(job.task_id)
                future = self.batcher.submit(
                    arrays,
                    deadline=job.deadline,
                    isolated=True,
                    before_run=lambda: self.deliveries.count_attempt(job.task_id),
                    # Cleared before the device thread runs anything else: if
                    # the next batch kills the process, this job is not blamed.
                    after_run=lambda: self.deliveries.survived(job.task_id),
                )
            else:
                future = self.batcher.submit(arrays, deadline=job.deadline)
        return spec.structure_outputs(future.result())

    def watch_device(self) -> None:
        """Start a thread that stops the process if a device call hangs.

        A call that never returns (a wedged GPU, a deadlocked native op) would
        hold every job of this process forever while its readiness record still
        said "ready". Past ``device_timeout_s`` the process stops like one whose
        device thread died; its unacknowledged jobs are redelivered, and one that
        hangs every time it runs ends as a poison job.
        """
        limit_s = self.settings.device_timeout_s
        stop = threading.Event()
        self._stop_watching = stop.set

        def watch() -> None:
            while not stop.wait(min(1.0, limit_s / 4)):
                running_s = self.batcher.call_running_s(time.monotonic())
                if running_s > limit_s:
                    self._device_thread_died(
                        PredictionError(
                            f"a device call has run for {running_s:.0f}s, over "
                            f"PREDICTQ_DEVICE_TIMEOUT_S={limit_s:g}: the device is hung"
                        )
                    )
                    return

        threading.Thread(target=watch, name="predictq-device-watch", daemon=True).start()

    def stop_watching(self) -> None:
        """Stop the device watchdog (shutdown)."""
        self._stop_watching()

    def _device_thread_died(self, error: BaseException) -> None:
        # No device thread, no predictions: stop counting as ready at once,
        # then let the worker stop (workers/fatal.py) instead of requeueing
        # every job it receives from now on.
        metrics.MODEL_READY.set(0)
        if self.readiness is not None:
            self.readiness.close()
        if self._on_fatal is not None:
            self._on_fatal(error)

    def _resolve(self, raw: object, task_id: str) -> object:
        """The job's input, read from Redis when it travelled by reference."""
        key = payloads.referenced_key(raw, task_id)
        if key is None:
            return raw
        try:
            return payloads.fetch(self.broker, key, max_bytes=self.settings.max_payload_bytes)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise BrokerUnavailable(f"cannot read the job's input from Redis: {e}") from e

    def forget_payload(self, raw: object, task_id: str) -> None:
        """Delete a referenced input once its job has a final outcome (best effort)."""
        try:
            key = payloads.referenced_key(raw, task_id)
            if key is not None:
                self.broker.delete(key)
        except (redis.RedisError, PredictqError) as e:
            log.warning("could not delete a job's stored input (it expires by itself): %s", e)


class _Process:
    """This process's runtime and how many times it loaded a model (should be 1)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runtime: Runtime | None = None
        self.loads = 0


_process = _Process()


def start_runtime(
    settings: Settings,
    *,
    nodename: str,
    pool: str,
    index: int = 0,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> Runtime:
    """Load the model for this process (once) and start serving it.

    ``on_fatal`` is called (on the device thread) if the process can no longer
    serve, after its readiness record was withdrawn.
    """
    with _process.lock:
        if _process.runtime is not None:
            return _process.runtime
        if not settings.model_path:
            raise ConfigError("PREDICTQ_MODEL_PATH must name the model to serve, got nothing")
        started = time.monotonic()
        device = configure_devices(settings)
        import_model_modules(settings.model_imports)
        model = load_model(settings.model_path)
        _process.loads += 1
        # One inference per batch shape the device thread will see: single jobs
        # and full batches. The function is batch-polymorphic, so this traces
        # once and also fails fast if a full batch does not fit the device.
        model.warm_up(sorted({1, settings.max_batch_size}))
        warm_s = time.monotonic() - started
        runtime = Runtime(settings, model, device.kind, on_fatal)
        runtime.batcher.start()
        runtime.watch_device()
        metrics.record_model(model.spec, warm_s, device.kind)
        metrics_port = None
        if settings.metrics_port is not None:
            metrics_port = metrics.serve(
                settings.metrics_port + index if settings.metrics_port else 0
            )
        runtime.readiness = ReadinessRecord(
            runtime.redis,
            nodename,
            os.getpid(),
            settings.readiness_ttl_s,
            _record_fields(runtime, pool, warm_s, metrics_port),
        )
        runtime.readiness.publish()
        _process.runtime = runtime
        log.info(
            "model ready in %.2fs on %s (pid %d, %s pool)", warm_s, device.kind, os.getpid(), pool
        )
        return runtime


def _record_fields(
    runtime: Runtime, pool: str, warm_s: float, metrics_port: int | None
) -> dict[str, Any]:
    return {
        "pool": pool,
        "loads": _process.loads,
        "warm": True,
        "device": runtime.device,
        "load_s": round(warm_s, 3),
        "since": datetime.now(UTC).isoformat(),
        "metrics_port": metrics_port,
        "max_batch_size": runtime.settings.max_batch_size,
        "model": runtime.model.spec.as_dict(),
    }


def current_runtime() -> Runtime:
    """The process's runtime; ModelNotReady if the model is not loaded (yet)."""
    runtime = _process.runtime
    if runtime is None:
        raise ModelNotReady(f"no model is loaded in worker process {os.getpid()}")
    return runtime


def stop_runtime() -> None:
    """Finish queued batches, then withdraw the readiness record (reverse of start)."""
    with _process.lock:
        runtime, _process.runtime = _process.runtime, None
    if runtime is None:
        return
    runtime.stop_watching()
    if not runtime.batcher.close(runtime.settings.shutdown_timeout_s):
        log.error("device thread did not finish within %.0fs", runtime.settings.shutdown_timeout_s)
    if runtime.readiness is not None:
        runtime.readiness.close()
    metrics.MODEL_READY.set(0)
    log.info("model runtime stopped (pid %d)", os.getpid())

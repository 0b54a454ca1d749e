"""A worker process's life, in one place: start serving, stop, and stop when it cannot serve.

Celery's signal handlers (workers/signals.py) call these functions and nothing else:

* ``start_worker`` / ``stop_worker``: the main worker process (``worker_init`` /
  ``worker_shutdown``). The threads pool serves in the main process itself, so
  there they also start and stop serving.
* ``start_serving`` / ``stop_serving``: every process that runs a model (the
  threads pool's worker process, the solo worker, each prefork child).
  ``start_serving`` enters each step into a ``contextlib.ExitStack`` together
  with its undo: a start that fails half-way unwinds what it did, and
  ``stop_serving`` closes the stack, which is the start run backwards. Each runs
  once per process (``_process.lock``): a second call is a no-op, not a second
  model load.
* ``shutdown_began``: ``worker_shutting_down``, which bounds the shutdown.

A worker that cannot serve stops instead of spinning. Celery's ``Signal.send``
catches every ``Exception`` a handler raises and only logs it, so a model that
failed to load would leave a worker that consumes jobs it can only hand back, in
a hot loop, taking them from healthy workers. So:

* a failure while starting raises ``SystemExit`` (a ``BaseException``, which
  ``Signal.send`` lets through): the threads and solo pools start in the worker
  process itself and Celery exits with that code; a prefork child also stops
  its parent, or billiard would fork a replacement that fails the same way;
* a device thread that dies, or a device call that hangs past
  ``device_timeout_s``, withdraws the process's readiness and stops it: a warm
  shutdown for the threads and solo pools, so reserved jobs go back to the
  queue; a prefork child exits and billiard forks a fresh one, whose jobs
  ``reject_on_worker_lost`` requeues.

Either way the worker exits non-zero, so a supervisor (docker, systemd) sees a
failure and ``predictq health`` stops counting it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from contextlib import ExitStack, closing
from datetime import UTC, datetime
from typing import Any, NoReturn

from billiard.process import active_children

from predictq.errors import ConfigError, ModelLoadError, ModelNotReady, Requeue
from predictq.readiness import ReadinessRecord
from predictq.redis_client import client_for
from predictq.settings import Settings, mask_url
from workers import backends, gcfreeze, metrics
from workers.app import pool_kind, worker_settings
from workers.deliveries import DeliveryTracker
from workers.device import configure_devices
from workers.devicethread import device_thread
from workers.exitcodes import EX_SOFTWARE, code_for
from workers.hotload import RepositoryWatcher, warm_on_device
from workers.model import import_model_modules
from workers.registry import ModelRegistry, ServedVersion
from workers.runtime import Runtime
from workers.shards import Sharder

log = logging.getLogger(__name__)


class _Worker:
    """The main worker process's state; prefork children inherit it (set before the fork)."""

    pool = "unknown"
    # The code the main process should exit with, 0 while nothing went wrong,
    # shared with prefork children. A raw value (no lock): a lock held at fork
    # time would deadlock a child.
    exit_code: ctypes.c_int | None = None
    shutdown_deadline: threading.Thread | None = None


class _Process:
    """This process's serving state. ``lock`` serializes start and stop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stack: ExitStack | None = None  # what stop_serving undoes
        self.runtime: Runtime | None = None
        self.readiness: ReadinessRecord | None = None
        self.registry: ModelRegistry | None = None
        self.watcher: RepositoryWatcher | None = None
        self.stopped = False


_process = _Process()


# --- the main worker process ---------------------------------------------------------


def start_worker(worker: Any) -> None:
    """``worker_init``: check settings and pool; the threads pool starts serving here."""
    # Celery sends worker_init before it sets up logging; without this, the
    # INFO lines of the model load would be dropped.
    worker.setup_logging()
    if _Worker.exit_code is None:  # before any prefork child is forked
        _Worker.exit_code = multiprocessing.RawValue(ctypes.c_int, 0)
    try:
        settings = worker_settings()
        _Worker.pool = pool_kind(worker.pool_cls)
    except ConfigError as e:
        _abort_start(e)
    log.info(
        "predictq worker %s: pool=%s broker=%s backend=%s models=%s",
        worker.hostname,
        _Worker.pool,
        mask_url(settings.broker_url),
        mask_url(settings.result_backend),
        settings.model_repository or settings.model_path,
    )
    if settings.log_level != "DEBUG":
        # Celery decides once, when it builds its task tracers and strategies,
        # whether to log every task at INFO, with a repr() of the result array;
        # at thousands of jobs per second that costs more than the prediction.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    if _Worker.pool == "threads":
        # celery/concurrency/thread.py never sends worker_process_init: load
        # here, before the consumer starts and before any task is received.
        start_serving(nodename=worker.hostname, index=0)


def shutdown_began() -> None:
    """``worker_shutting_down``: end this process at the latest ``shutdown_timeout_s`` from now.

    Celery's threads pool waits for running jobs without a time limit, so a hung
    device call would keep a stopping worker alive forever. Celery's own
    ``worker_soft_shutdown_timeout`` (5.7) cannot bound that: it applies to cold
    shutdowns only (SIGQUIT, not the SIGTERM of docker and systemd), sleeps the
    whole timeout whenever a task is active, and then cancels requests, which
    cannot stop a thread inside a device call; the pool's executor still joins
    it. So a deadline thread ends the process with ``os._exit``; the jobs it
    still held are unacknowledged and Redis redelivers them after the
    visibility timeout.
    """
    if _Worker.shutdown_deadline is not None:
        return  # a second signal (e.g. Ctrl-C twice) keeps the first deadline
    timeout_s = worker_settings().shutdown_timeout_s

    def expire() -> None:
        threading.Event().wait(timeout_s)
        log.error(
            "shutdown did not finish within %.0fs (PREDICTQ_SHUTDOWN_TIMEOUT_S): exiting; "
            "unfinished jobs are redelivered after the visibility timeout",
            timeout_s,
        )
        _record(EX_SOFTWARE)
        for child in active_children():
            # Prefork children would run on, orphaned, without this.
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGKILL)
        os._exit(EX_SOFTWARE)

    _Worker.shutdown_deadline = threading.Thread(
        target=expire, name="predictq-shutdown", daemon=True
    )
    _Worker.shutdown_deadline.start()


def stop_worker(worker: Any) -> None:
    """``worker_shutdown`` (the pool has stopped): stop serving, set the exit code."""
    stop_serving()
    if exit_code() and worker is not None:
        # Read by `celery worker` after start() returns: ctx.exit(worker.exitcode).
        worker.exitcode = exit_code()


def exit_code() -> int:
    """The code the worker should exit with (0: no failure recorded)."""
    return 0 if _Worker.exit_code is None else int(_Worker.exit_code.value)


# --- every process that serves ------------------------------------------------------


def start_serving(*, nodename: str, index: int) -> None:
    """Load the model (once per process) and serve it; stop the worker if that fails.

    ``index`` numbers prefork children (their metrics port is ``port + index``).
    """
    try:
        _start(worker_settings(), nodename=nodename, index=index)
    except Exception as e:
        _abort_start(e)


def stop_serving() -> None:
    """Undo ``start_serving``, last step first (no-op if this process does not serve)."""
    with _process.lock:
        stack, _process.stack = _process.stack, None
        if stack is not None:
            stack.close()
            log.info("model runtime stopped (pid %d)", os.getpid())


def current_runtime() -> Runtime:
    """The process's runtime; ModelNotReady before it is loaded, Requeue once it stopped."""
    runtime = _process.runtime
    if runtime is None:
        if _process.stopped:
            raise Requeue(f"worker process {os.getpid()} is stopping")
        raise ModelNotReady(f"no model is loaded in worker process {os.getpid()}")
    return runtime


def current_readiness() -> ReadinessRecord | None:
    """This process's readiness record; None while it does not serve (or in a prefork parent)."""
    return _process.readiness


def _start(settings: Settings, *, nodename: str, index: int) -> None:
    with _process.lock:
        if _process.stack is not None or _process.stopped:
            return
        if not settings.model_path and not settings.model_repository:
            raise ConfigError(
                "PREDICTQ_MODEL_PATH must name the model to serve (or PREDICTQ_MODEL_REPOSITORY "
                "a directory of <name>/<version>/ models), got nothing"
            )
        with ExitStack() as stack:
            started = time.monotonic()
            # First: the Keras backend and its devices are chosen before Keras loads.
            devices = configure_devices(settings)
            device = devices.kind
            import_model_modules(settings.model_imports)
            # Closed after the device thread (an ExitStack unwinds in reverse).
            sharder = Sharder(devices.cpu_shards, settings.cpu_shard_min_rows)
            stack.callback(sharder.close)

            results = stack.enter_context(closing(client_for(settings, settings.result_backend)))
            broker = stack.enter_context(closing(client_for(settings, settings.broker_url)))
            # One device thread for every model of the process: the device
            # invariant (one call at a time, workers/batcher.py) holds across models.
            batcher = stack.enter_context(device_thread(settings, on_failure=_cannot_serve))
            registry = ModelRegistry(on_release=_released)
            watcher = RepositoryWatcher(
                settings,
                registry,
                warm=functools.partial(warm_on_device, batcher),
                sharder=sharder,
                on_loaded=functools.partial(_loaded, device=device),
                on_change=_models_changed,
            )
            # Serving starts with the same pass that hot loading repeats.
            watcher.sync()
            if not registry.served():
                raise watcher.last_error or ModelLoadError(
                    "no model version to serve in "
                    f"{settings.model_repository or settings.model_path!r} (expected "
                    "<name>/<version>/ directories holding a model)"
                )
            if settings.gc_freeze:
                # Before the first job: one full collection (~200 ms) now, not mid-storm.
                stack.enter_context(gcfreeze.frozen())
            warm_s = time.monotonic() - started
            _process.registry = registry
            stack.callback(setattr, _process, "registry", None)

            metrics.MODEL_READY.set(1)
            stack.callback(metrics.MODEL_READY.set, 0)
            server = metrics.serve_for(settings, index)
            if server is not None:
                stack.callback(metrics.stop, server)

            fields = {
                "pool": _Worker.pool,
                "queue": settings.queue,
                "warm": True,
                "device": device,
                "cpu_shards": devices.cpu_shards,
                "backend": backends.current().name,
                "load_s": round(warm_s, 3),
                "since": datetime.now(UTC).isoformat(),
                "metrics_port": None if server is None else server.server_address[1],
                "max_batch_size": settings.max_batch_size,
            }
            readiness = ReadinessRecord(
                results,
                nodename,
                os.getpid(),
                settings.readiness_ttl_s,
                {**fields, "loads": watcher.loads, **registry.describe()},
            )
            readiness.publish()
            stack.callback(readiness.close)
            _process.readiness = readiness
            stack.callback(setattr, _process, "readiness", None)

            # Hot loading from now on; it stops before the device thread it warms on.
            _process.watcher = watcher
            stack.callback(setattr, _process, "watcher", None)
            watcher.start()
            stack.callback(watcher.close)

            deliveries = DeliveryTracker(
                results, max_deliveries=settings.max_deliveries, ttl_s=settings.result_ttl_s
            )
            _process.runtime = Runtime(
                registry, batcher, settings=settings, broker=broker, deliveries=deliveries
            )
            # The first step of a stop: jobs that arrive from now on go back to the queue.
            stack.callback(_withdraw_runtime)

            _process.stack = stack.pop_all()
        log.info(
            "models ready in %.2fs on %s with %s (pid %d, %s pool): %s",
            warm_s,
            device,
            backends.current().name,
            os.getpid(),
            _Worker.pool,
            {name: [v.version for v in vs] for name, vs in registry.served().items()},
        )


def reload_models(*_: Any) -> None:
    """SIGHUP: look at the model repository now (a no-op while the process does not serve)."""
    watcher = _process.watcher
    if watcher is not None:
        watcher.wake()  # only sets an event: safe in a signal handler


def install_reload_signal() -> None:
    """Make SIGHUP reload the model repository (threads and solo pools: the serving process)."""
    if _Worker.pool == "prefork":
        return  # the children serve; they reload on PREDICTQ_MODEL_POLL_S
    try:
        signal.signal(signal.SIGHUP, reload_models)
    except ValueError as e:  # not the main thread
        log.warning("SIGHUP cannot reload the models (%s); they reload every poll", e)


def _loaded(served: ServedVersion, *, device: str) -> None:
    metrics.record_served(served.name, served.version, served.model, device)


def _released(served: ServedVersion) -> None:
    metrics.record_released(served.name, served.version)
    gcfreeze.refreeze_soon()  # its frozen cycles become collectable


def _models_changed() -> None:
    gcfreeze.refreeze_soon()  # a new version's objects join the frozen ones
    registry, readiness, watcher = _process.registry, _process.readiness, _process.watcher
    if registry is not None and readiness is not None and watcher is not None:
        readiness.update({"loads": watcher.loads, **registry.describe()})


def _withdraw_runtime() -> None:
    _process.stopped = True
    _process.runtime = None


def _cannot_serve(error: BaseException) -> None:
    # No device, no predictions: stop counting as ready at once, then stop the
    # worker instead of requeueing every job it receives from now on.
    metrics.MODEL_READY.set(0)
    readiness = _process.readiness
    if readiness is not None:
        readiness.close()
    log.critical("worker process %d stops: %s", os.getpid(), error)
    if _Worker.pool == "prefork":
        # The parent stays: it forks a fresh child that loads the model again.
        os._exit(EX_SOFTWARE)
    _record(EX_SOFTWARE)
    # Celery's own SIGTERM handler: a warm shutdown, from any thread.
    os.kill(os.getpid(), signal.SIGTERM)


def _abort_start(error: BaseException) -> NoReturn:
    """The process could not start serving: stop the worker, exit non-zero."""
    code = code_for(error)
    log.critical("worker cannot serve, stopping: %s: %s", type(error).__name__, error)
    _record(code)
    if _Worker.pool == "prefork":  # a child: worker_init already ran in its parent
        os.kill(os.getppid(), signal.SIGTERM)
        # Not SystemExit: billiard would treat it as this child's normal end.
        os._exit(code)
    raise SystemExit(code) from error


def _record(code: int) -> None:
    if _Worker.exit_code is not None and not _Worker.exit_code.value:
        _Worker.exit_code.value = code

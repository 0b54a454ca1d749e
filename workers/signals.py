"""Where each worker process loads its model: Celery signal handlers.

* prefork: ``worker_process_init`` fires in each child after the fork; the
  parent never imports TensorFlow (TensorFlow is not fork-safe: a parent that
  initialised it hands broken runtime state to its children).
* solo: ``worker_process_init`` fires in the worker process itself.
* threads: ``celery/concurrency/thread.py`` never sends
  ``worker_process_init``, so the model loads in ``worker_init``, in the worker
  process, before the consumer starts and before any task is received.

Shutdown is the reverse: ``worker_shutdown`` (after the pool stopped, so every
running job has its result) or ``worker_process_shutdown`` for prefork children.
A process that cannot load its model, or whose device thread died, stops the
worker with a non-zero exit code rather than requeueing jobs forever
(workers/fatal.py).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.concurrency import get_implementation
from celery.concurrency.prefork import TaskPool as PreforkPool
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadsPool

from predictq.errors import ConfigError
from predictq.settings import mask_url
from workers import fatal
from workers.app import export_flower_options, worker_settings
from workers.runtime import start_runtime, stop_runtime

log = logging.getLogger(__name__)


class _Worker:
    """Set in the main worker process by worker_init; prefork children inherit it."""

    pool = "unknown"


def _pool_kind(pool_cls: Any) -> str:
    cls = get_implementation(pool_cls)
    for kind, known in (("threads", ThreadsPool), ("prefork", PreforkPool), ("solo", SoloPool)):
        if isinstance(cls, type) and issubclass(cls, known):
            return kind
    raise ConfigError(
        f"worker pool must be threads, prefork or solo, got {getattr(cls, '__name__', cls)}"
    )


def _on_cli_start(**_: Any) -> None:
    # Before `celery -A workers flower` parses FLOWER_* options.
    export_flower_options(worker_settings())


def _on_worker_init(sender: Any, **_: Any) -> None:
    # Celery sends worker_init before it sets up logging; without this, the
    # INFO lines of the model load below would be dropped.
    sender.setup_logging()
    fatal.prepare()
    try:
        settings = worker_settings()
        _Worker.pool = _pool_kind(sender.pool_cls)
    except ConfigError as e:
        fatal.abort_start(e, prefork_child=False)
    log.info(
        "predictq worker %s: pool=%s broker=%s backend=%s model=%s",
        sender.hostname,
        _Worker.pool,
        mask_url(settings.broker_url),
        mask_url(settings.result_backend),
        settings.model_path,
    )
    if settings.log_level != "DEBUG":
        # Celery decides once, when it builds its task tracers and strategies,
        # whether to log every task at INFO, with a repr() of the result array;
        # at thousands of jobs per second that costs more than the prediction.
        logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
        logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    if _Worker.pool == "threads":
        _start(settings, nodename=sender.hostname, index=0)


def _on_worker_process_init(sender: Any = None, **_: Any) -> None:
    from billiard.process import current_process

    # billiard numbers prefork children from 0 (a replacement takes the index of
    # the child it replaces); the solo pool has no index: 0.
    index = getattr(current_process(), "index", 0) or 0
    _start(worker_settings(), nodename=str(sender), index=index)


def _start(settings: Any, *, nodename: str, index: int) -> None:
    prefork_child = _Worker.pool == "prefork"
    try:
        start_runtime(
            settings,
            nodename=nodename,
            pool=_Worker.pool,
            index=index,
            on_fatal=lambda e: fatal.stop_serving(e, prefork_child=prefork_child),
        )
    except Exception as e:
        fatal.abort_start(e, prefork_child=prefork_child)


def _on_worker_shutting_down(**_: Any) -> None:
    # Sent by Celery's signal handler in the main process when a warm or cold
    # shutdown begins; the threads pool would wait for a hung job forever.
    fatal.start_shutdown_watchdog(worker_settings().shutdown_timeout_s)


def _on_worker_process_shutdown(**_: Any) -> None:
    stop_runtime()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    stop_runtime()
    if fatal.exit_code() and sender is not None:
        # Read by `celery worker` after start() returns: ctx.exit(worker.exitcode).
        sender.exitcode = fatal.exit_code()


# Connected explicitly (not as decorators) so the handlers keep their types.
signals.user_preload_options.connect(_on_cli_start)
signals.worker_init.connect(_on_worker_init)
signals.worker_process_init.connect(_on_worker_process_init)
signals.worker_shutting_down.connect(_on_worker_shutting_down)
signals.worker_process_shutdown.connect(_on_worker_process_shutdown)
signals.worker_shutdown.connect(_on_worker_shutdown)

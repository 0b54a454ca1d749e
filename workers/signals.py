"""Celery signal handlers: thin adapters onto workers/lifecycle.py.

Where each worker process starts and stops serving its model:

* threads: ``celery/concurrency/thread.py`` never sends
  ``worker_process_init``, so the model loads in ``worker_init``, in the worker
  process, before the consumer starts and before any task is received;
* prefork: ``worker_process_init`` fires in each child after the fork; the
  parent never imports TensorFlow (TensorFlow is not fork-safe: a parent that
  initialised it hands broken runtime state to its children);
* solo: ``worker_process_init`` fires in the worker process itself.

Stopping is the reverse: ``worker_shutdown`` (after the pool stopped, so every
running job has its result), or ``worker_process_shutdown`` in a prefork child.
``worker_shutting_down`` (the signal arrived) starts the shutdown deadline.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from workers import lifecycle
from workers.app import export_flower_options, worker_settings


def _on_cli_start(**_: Any) -> None:
    # Before `celery -A workers flower` parses FLOWER_* options.
    export_flower_options(worker_settings())


def _on_worker_init(sender: Any, **_: Any) -> None:
    lifecycle.start_worker(sender)


def _on_worker_process_init(sender: Any = None, **_: Any) -> None:
    from billiard.process import current_process

    # billiard numbers prefork children from 0 (a replacement takes the index of
    # the child it replaces); the solo pool has no index: 0.
    index = getattr(current_process(), "index", 0) or 0
    lifecycle.start_serving(nodename=str(sender), index=index)


def _on_worker_ready(**_: Any) -> None:
    # Celery installs its own SIGHUP handler (restart the worker by exec) in
    # WorkController.on_start, after worker_init; worker_ready comes later, in
    # the main thread, so this one replaces it: SIGHUP reloads the models.
    lifecycle.install_reload_signal()


def _on_worker_shutting_down(**_: Any) -> None:
    # Sent by Celery's signal handler in the main process when a warm or cold shutdown begins.
    lifecycle.shutdown_began()


def _on_worker_process_shutdown(**_: Any) -> None:
    lifecycle.stop_serving()


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    lifecycle.stop_worker(sender)


# Connected explicitly (not as decorators) so the handlers keep their types.
signals.user_preload_options.connect(_on_cli_start)
signals.worker_init.connect(_on_worker_init)
signals.worker_process_init.connect(_on_worker_process_init)
signals.worker_ready.connect(_on_worker_ready)
signals.worker_shutting_down.connect(_on_worker_shutting_down)
signals.worker_process_shutdown.connect(_on_worker_process_shutdown)
signals.worker_shutdown.connect(_on_worker_shutdown)

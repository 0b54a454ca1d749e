"""Stopping a worker process that cannot serve, instead of letting it spin.

Celery's ``Signal.send`` catches every ``Exception`` a handler raises and only
logs it. A model that failed to load in ``worker_init`` would therefore leave a
worker that consumes jobs it can only hand back (``ModelNotReady`` → requeue),
in a hot loop, taking them from healthy workers. So:

* a failure while starting raises ``SystemExit`` (a ``BaseException``, which
  ``Signal.send`` lets through): the threads and solo pools start in the worker
  process itself and Celery exits with that code; a prefork child also stops
  its parent, or billiard would fork a replacement that fails the same way;
* a failure while serving (the device thread died) withdraws the process's
  readiness and stops it: a warm shutdown for the threads and solo pools, so
  reserved jobs go back to the queue; a prefork child exits and billiard forks a
  fresh one, whose jobs ``reject_on_worker_lost`` requeues.

Either way the worker exits non-zero, so a supervisor (docker, systemd) sees a
failure and ``predictq health`` stops counting it.

A graceful shutdown is bounded too: Celery's threads pool waits for running
jobs without a time limit, so a hung device call would keep a stopping worker
alive forever. ``start_shutdown_watchdog`` ends the process
``shutdown_timeout_s`` after the shutdown began; the jobs it still held are
unacknowledged and Redis redelivers them after the visibility timeout.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
from typing import NoReturn

from billiard.process import active_children

from predictq.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

#: A setting or the model file must be fixed (sysexits.h EX_CONFIG).
EX_CONFIG = 78
#: Anything else that makes a worker unable to serve (sysexits.h EX_SOFTWARE).
EX_SOFTWARE = 70


class _State:
    # Shared with prefork children (created before the fork): the exit code the
    # main process should end with, 0 while nothing went wrong.
    # A raw value (no lock): a lock held at fork time would deadlock a child.
    exit_code: ctypes.c_int | None = None
    watchdog: threading.Thread | None = None


def prepare() -> None:
    """Call in the main worker process, before any prefork child is forked."""
    if _State.exit_code is None:
        _State.exit_code = multiprocessing.RawValue(ctypes.c_int, 0)


def exit_code() -> int:
    """The code the worker process should exit with (0: no failure recorded)."""
    return 0 if _State.exit_code is None else int(_State.exit_code.value)


def _record(code: int) -> None:
    if _State.exit_code is not None and not _State.exit_code.value:
        _State.exit_code.value = code


def code_for(error: BaseException) -> int:
    """EX_CONFIG for what an operator must fix in the configuration, else EX_SOFTWARE."""
    return EX_CONFIG if isinstance(error, ConfigError | ModelLoadError) else EX_SOFTWARE


def abort_start(error: BaseException, *, prefork_child: bool) -> NoReturn:
    """The process could not start serving: stop the worker, exit non-zero."""
    code = code_for(error)
    log.critical("worker cannot serve, stopping: %s: %s", type(error).__name__, error)
    _record(code)
    if prefork_child:
        os.kill(os.getppid(), signal.SIGTERM)
        # Not SystemExit: billiard would treat it as this child's normal end.
        os._exit(code)
    raise SystemExit(code) from error


def stop_serving(error: BaseException, *, prefork_child: bool) -> None:
    """The process can no longer serve (called from the dying device thread)."""
    log.critical("worker process %d stops: %s", os.getpid(), error)
    if prefork_child:
        # The parent stays: it forks a fresh child that loads the model again.
        os._exit(EX_SOFTWARE)
    _record(EX_SOFTWARE)
    # Celery's own SIGTERM handler: a warm shutdown, from any thread.
    os.kill(os.getpid(), signal.SIGTERM)


def start_shutdown_watchdog(timeout_s: float) -> None:
    """End this process ``timeout_s`` from now unless it has exited by then."""
    if _State.watchdog is not None:
        return  # a second signal (e.g. Ctrl-C twice) keeps the first deadline

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

    _State.watchdog = threading.Thread(target=expire, name="predictq-shutdown", daemon=True)
    _State.watchdog.start()

"""A worker process's one device thread (its batcher) and the watchdog that guards it.

Every model version of the process runs through this one batcher, so device
calls stay one at a time per process across all its models (workers/batcher.py).
The watchdog calls ``on_failure`` (workers/lifecycle.py stops serving) if the
device thread dies or a device call hangs past ``PREDICTQ_DEVICE_TIMEOUT_S``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from predictq.errors import PredictionError
from predictq.settings import Settings
from workers import metrics
from workers.batcher import Batcher

log = logging.getLogger(__name__)


@contextmanager
def device_thread(
    settings: Settings, *, on_failure: Callable[[BaseException], None]
) -> Iterator[Batcher]:
    """The batcher's device thread and its watchdog: started together, stopped together.

    On exit the queued batches are finished (the jobs still running wait for
    them) within ``shutdown_timeout_s``; the watchdog stops first, so a slow
    drain is not taken for a hung device.
    """
    batcher = Batcher(
        max_batch_size=settings.max_batch_size,
        batch_wait_ms=settings.batch_wait_ms,
        on_batch=metrics.record_batch,
        on_isolate=metrics.record_isolation,
    )
    batcher.start()
    stop = threading.Event()
    watchdog = threading.Thread(
        target=_watch,
        args=(batcher, stop, settings.device_timeout_s, on_failure),
        name="predictq-device-watch",
        daemon=True,
    )
    watchdog.start()
    try:
        yield batcher
    finally:
        stop.set()
        if not batcher.close(settings.shutdown_timeout_s):
            log.error("device thread did not finish within %.0fs", settings.shutdown_timeout_s)
        watchdog.join(_WATCH_INTERVAL_S + 1)


#: The longest the watchdog waits between two looks at a running device call.
_WATCH_INTERVAL_S = 1.0


def _watch(
    batcher: Batcher,
    stop: threading.Event,
    limit_s: float,
    on_failure: Callable[[BaseException], None],
) -> None:
    """Stop serving if the device thread dies, or if one device call runs past ``limit_s``.

    A dead device thread serves nothing, and a device call that never returns (a
    wedged GPU, a deadlocked native op) holds every job of this process forever
    while its readiness record still says "ready". Either way the process stops
    serving; its unacknowledged jobs are redelivered, and one that hangs every
    time it runs ends as a poison job.
    """
    while not batcher.wait_ended(min(_WATCH_INTERVAL_S, limit_s / 4)):
        running_s = batcher.call_running_s(time.monotonic())
        if running_s > limit_s and not stop.is_set():
            on_failure(
                PredictionError(
                    f"a device call has run for {running_s:.0f}s, over "
                    f"PREDICTQ_DEVICE_TIMEOUT_S={limit_s:g}: the device is hung"
                )
            )
            return
        if stop.is_set():
            return
    if batcher.crash is not None and not stop.is_set():
        on_failure(batcher.crash)

"""Keep the garbage collector's full passes off what the worker loaded at start.

A worker's heap is mostly what importing TensorFlow, Keras and Celery and
loading the models made: ~440,000 objects that CPython's collector tracks
(measured: the benchmark's conv-net worker). A full (generation 2) collection
scans every one of them with the GIL held: ~200 ms during which no thread of
the process runs Python (the consumer, the jobs' threads, the device thread's
hand-offs). CPython starts one whenever the objects promoted to its oldest
generation since the last reach a quarter of those it holds (rare under a
storm of short jobs: none in 30 s of the benchmark's, measured; more often
with long-lived per-job state). Those objects live as long
as the process, or as a model version is served, so once the models are loaded
and warm the worker freezes them (``gc.freeze``: a permanent generation that no
collection scans); collections then scan only what was made since.

Frozen objects are never collected, and a model version's objects hold reference
cycles (Keras layers and their model, traced functions), so whenever the served
versions change (a hot load, a release) the worker unfreezes, collects once (one
full pass per change, on a thread of its own) and freezes again: a released
version's memory is returned, a new one's objects join the frozen ones.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from workers import metrics

log = logging.getLogger(__name__)

# gc.freeze, unfreeze and collect act on the whole process: one caller at a
# time. _active: set between frozen()'s entry and exit (refreeze_soon acts only then).
_lock = threading.Lock()
_active = threading.Event()


@contextmanager
def frozen() -> Iterator[int]:
    """Freeze the long-lived objects now (yields how many), and unfreeze them on exit."""
    count = _freeze()
    _active.set()
    try:
        yield count
    finally:
        with _lock:
            _active.clear()
            gc.unfreeze()
            metrics.GC_FROZEN.set(0)


def refreeze_soon() -> threading.Thread | None:
    """Collect and freeze again, on a thread of its own (a full collection takes
    ~200 ms), if ``frozen`` is active; the thread, or None."""
    if not _active.is_set():
        return None
    thread = threading.Thread(target=_refreeze, name="predictq-gc", daemon=True)
    thread.start()
    return thread


def _freeze(*, only_while_active: bool = False) -> int:
    with _lock:
        if only_while_active and not _active.is_set():
            return 0  # the worker stopped serving meanwhile
        started = time.monotonic()
        # Back into the oldest generation first, so that this collection also
        # frees cycles among objects an earlier freeze kept (a released model).
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        count = gc.get_freeze_count()
        metrics.GC_FROZEN.set(count)
    log.info("froze %d long-lived objects (%.0f ms)", count, (time.monotonic() - started) * 1e3)
    return count


def _refreeze() -> None:
    try:
        _freeze(only_while_active=True)
    except Exception:
        # Never fatal: the worker then collects as CPython does by default.
        log.exception("could not refreeze the long-lived objects")

"""Hot loading: keep a process's served versions in step with its model repository.

``RepositoryWatcher.sync`` looks at the repository (workers/repository.py) and,
for each model, wants the newest ``PREDICTQ_MODEL_KEEP_VERSIONS`` versions that
have not failed to load. It loads and warms each missing one beside those
serving (newest first, so new jobs reach the newest version as early as
possible), hands it to the registry (new jobs get it from then on), and retires
versions no longer wanted (older than the newest N, replaced, or removed from
disk): they finish the jobs they already have and are released after
(workers/registry.py). A version that fails to load or warm up (corrupt file,
wrong shapes, out of memory) is logged, counted in
``predictq_model_load_failures`` and skipped until its directory changes; the
versions already serving go on serving.

It runs once when the process starts serving (the same path as a hot load), then
on its own thread every ``PREDICTQ_MODEL_POLL_S`` and at once on ``wake()``
(SIGHUP). Warm-up runs on the batcher's device thread, between batches
(``Batcher.on_device``): device calls stay one at a time per process.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable

from predictq.errors import ModelLoadError
from predictq.settings import Settings
from workers import metrics
from workers.batcher import Batcher
from workers.model import LoadedModel, load_model
from workers.registry import ModelRegistry, ServedVersion
from workers.repository import VersionDir, model_file, scan
from workers.shards import Sharder

log = logging.getLogger(__name__)


def warm_on_device(batcher: Batcher, model: LoadedModel) -> None:
    """One inference per batch shape the backend compiles for, each its own device call.

    Single jobs and full batches (TensorFlow traces once, its function is
    batch-polymorphic), or every batch-size bucket (JAX). This also fails fast if
    a full batch does not fit. On the device thread, between batches: the
    versions already serving keep their turns between two warm-up calls (a JAX
    compile of one bucket is the longest pause a hot load adds).
    """
    for size in model.warm_sizes:
        batcher.on_device(functools.partial(model.warm_up, [size])).result()


class RepositoryWatcher:
    """Loads new versions, retires old ones; one sync at a time."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        *,
        warm: Callable[[LoadedModel], None],
        on_loaded: Callable[[ServedVersion], None] | None = None,
        on_change: Callable[[], None] | None = None,
        sharder: Sharder | None = None,
    ) -> None:
        self._settings = settings
        self._sharder = sharder
        self._registry = registry
        #: Versions loaded by this process so far (a version loads once).
        self.loads = 0
        self._warm = warm
        self._on_loaded = on_loaded
        self._on_change = on_change
        # path -> stamp of a version directory that failed: skipped until replaced.
        self._failed: dict[str, tuple[int, int]] = {}
        self.last_error: BaseException | None = None
        self._sync_lock = threading.Lock()  # one sync at a time (thread, start-up)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="predictq-models", daemon=True)

    def sync(self) -> bool:
        """One pass over the repository; True if the served versions changed."""
        with self._sync_lock:
            models = scan(self._settings)
            served = self._registry.served()
            changed = False
            for name, versions in models.items():
                current = {s.version: s for s in served.get(name, [])}
                changed |= self._sync_model(versions, current)
            for name, gone in served.items():
                if name not in models:
                    for version in gone:
                        log.info("model %s: removed from the repository", name)
                        self._registry.retire(version)
                        changed = True
        if changed:
            # Keras models hold reference cycles: collect released versions now,
            # not at the next automatic full collection.
            gc.collect()
            if self._on_change is not None:
                self._on_change()
        return changed

    def _sync_model(self, versions: list[VersionDir], current: dict[int, ServedVersion]) -> bool:
        keep = self._settings.model_keep_versions
        changed = False
        while True:
            good = [v for v in versions if self._failed.get(v.path) != v.stamp]
            wanted = good[-keep:]
            failed = False
            for found in reversed(wanted):
                have = current.get(found.version)
                if have is not None and have.stamp == found.stamp:
                    continue
                served = self._load(found)
                if served is None:
                    failed = True  # choose again without it: an older one may be wanted now
                    break
                self._registry.add(served)
                current[found.version] = served
                changed = True
            if not failed:
                break
        wanted_stamps = {(v.version, v.stamp) for v in wanted}
        for version, served in list(current.items()):
            if (version, served.stamp) not in wanted_stamps:
                log.info(
                    "model %s version %d: retired (newest %d kept, or removed)",
                    served.name,
                    version,
                    keep,
                )
                self._registry.retire(served)
                changed = True
        return changed

    def _load(self, found: VersionDir) -> ServedVersion | None:
        name, version = found.name, found.version
        started = time.monotonic()
        try:
            model = load_model(
                model_file(found.path),
                max_batch_size=self._settings.max_batch_size,
                sharder=self._sharder,
            )
            self.loads += 1
            self._warm(model)
        except Exception as e:
            self._failed[found.path] = found.stamp
            self.last_error = e
            metrics.MODEL_LOAD_FAILURES.labels(model=name, version=str(version)).inc()
            log.error(
                "model %s version %d: cannot load or warm up %s, skipped (the versions "
                "already loaded keep serving): %s: %s",
                name,
                version,
                found.path,
                type(e).__name__,
                e,
            )
            return None
        load_s = time.monotonic() - started
        metrics.record_load(name, version, load_s)
        log.info("model %s version %d: loaded and warm in %.2fs", name, version, load_s)
        served = ServedVersion(name, version, model, found.stamp)
        if self._on_loaded is not None:
            self._on_loaded(served)
        return served

    # --- watcher thread ----------------------------------------------------------

    def start(self) -> None:
        """Watch on a thread of its own (every PREDICTQ_MODEL_POLL_S, and on ``wake``)."""
        self._thread.start()

    def wake(self) -> None:
        """Look at the repository now (the SIGHUP handler calls this: it only sets an event)."""
        self._wake.set()

    def close(self) -> None:
        """Stop watching (a load in progress finishes first)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        poll_s = self._settings.model_poll_s or None
        while True:
            self._wake.wait(poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.sync()
            except ModelLoadError as e:
                log.error("model repository: %s; the loaded versions keep serving", e)
            except Exception:
                # Never let the watcher die: the loaded versions serve on, and
                # the next poll tries again.
                log.exception("model repository sync failed; the loaded versions keep serving")

"""How many worker processes serve a queue, read from their readiness records, cached.

The coalescer (producer/coalescer.py) lets a client keep up to one unanswered
message per serving worker process before ``predict`` jobs wait to share the
next one (``PREDICTQ_COALESCE_MAX_UNANSWERED=0``, the default): fewer would
leave workers idle, more would send messages that only queue.

Reading the records costs a SCAN and a GET per record, so it never happens on
a submit: ``count`` returns the cached figure at once and, when it is older
than ``refresh_s``, wakes this object's own thread to read it again. Until the
first read lands, and whenever none can be made (Redis down, no worker yet),
the count is the last one known, at least 1.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from predictq.readiness import serving_records

log = logging.getLogger(__name__)


class ServingWorkers:
    """The number of live worker processes serving ``queue``, refreshed in the background."""

    def __init__(self, client: redis.Redis, queue: str, *, refresh_s: float = 1.0) -> None:
        self._client = client
        self._queue = queue
        self._refresh_s = refresh_s
        # Written by the refresh thread only; a stale read of an int is harmless.
        self._count = 1
        self._read_at = -float("inf")
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def count(self) -> int:
        """The last count read (>= 1); asks for a fresh one when it is stale. No I/O."""
        if time.monotonic() - self._read_at > self._refresh_s and not self._wanted.is_set():
            self._start()
            self._wanted.set()
        return self._count

    def close(self) -> None:
        """Stop the refresh thread."""
        self._closed = True
        self._wanted.set()
        with self._start_lock:
            thread = self._thread
        if thread is not None:
            thread.join(5)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="predictq-serving", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            if self._closed:
                return
            try:
                records = serving_records(self._client)
            except (redis.RedisError, OSError, ValueError) as e:
                log.debug("could not read readiness records (%s); keeping %d", e, self._count)
            else:
                # Records of workers older than the per-queue field count for every queue.
                mine = [r for r in records if r.get("queue", self._queue) == self._queue]
                self._count = max(1, len(mine))
            self._read_at = time.monotonic()
            self._wanted.clear()

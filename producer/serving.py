"""The producer's view of the workers serving its queue, read from their readiness records.

Every serving worker process says in its readiness record (predictq/readiness.py)
which queue it consumes, which models and versions it has loaded, and its
default model. A client asks two things of them:

* how many processes serve its queue (``count``): the coalescer lets a client
  keep up to one unanswered message per serving process before ``predict``
  jobs wait to share the next one (``PREDICTQ_COALESCE_MAX_UNANSWERED=0``, the
  default; producer/coalescer.py): fewer would leave workers idle, more would
  send messages that only queue;
* whether some process serves a job's model and pinned version (``check``):
  if none does, ``UnknownModel`` before the job is published, never a job
  waiting in a queue for a model nobody has. When no worker at all is up there
  is nothing to check against: the job is queued as usual and the first worker
  to start answers it (with ``UnknownModel`` itself, if it lacks the model).

Reading the records costs a SCAN and a GET per record, so a submit does not
read them: both answers come from the last read, and a stale one wakes this
object's own thread to read them again (every ``refresh_s``). Two exceptions,
both on ``check``: a client's first check reads them at once (a wrong model
name fails on the first submit, not a second later), and a miss reads them
again once, fresh, so that a version loaded a moment ago is not refused. Until
a read lands, and whenever none can be made (Redis down, no worker yet), the
count is the last one known, at least 1, and every model passes the check
(the worker checks every job anyway).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis

from predictq.errors import UnknownModel
from predictq.modelref import ModelRef
from predictq.readiness import serving_records

log = logging.getLogger(__name__)


class ServingView:
    """The worker processes serving ``queue`` and their models, refreshed in the background."""

    def __init__(self, client: redis.Redis, queue: str, *, refresh_s: float = 1.0) -> None:
        self._client = client
        self._queue = queue
        self._refresh_s = refresh_s
        # Guards the three fields below; each read replaces them together.
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] | None = None  # None until a read lands
        # The answer per reference for the records read last (a submit costs a dict lookup).
        self._answers: dict[ModelRef, str | None] = {}
        self._count = 1
        self._read_at = -float("inf")
        self._wanted = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def count(self) -> int:
        """Processes serving the queue at the last read (>= 1). No I/O."""
        self._refresh_if_stale()
        return self._count

    def check(self, ref: ModelRef) -> None:
        """Raise ``UnknownModel`` if workers are up and none of them serves ``ref``."""
        self._refresh_if_stale()
        if self._records is None:
            self._read_now()
        if self._problem(ref) is None:
            return
        self._read_now()
        problem = self._problem(ref)
        if problem is not None:
            raise UnknownModel(problem)

    def close(self) -> None:
        """Stop the refresh thread."""
        self._closed = True
        self._wanted.set()
        with self._start_lock:
            thread = self._thread
        if thread is not None:
            thread.join(5)

    def _problem(self, ref: ModelRef) -> str | None:
        with self._lock:
            if self._records is None:
                return None
            if ref not in self._answers:
                self._answers[ref] = problem(self._records, ref)
            return self._answers[ref]

    def _read_now(self) -> None:
        try:
            records = serving_records(self._client)
        except (redis.ConnectionError, redis.TimeoutError):
            return  # cannot look: let the job go; the worker checks it anyway
        self._store(records)

    def _store(self, records: list[dict[str, Any]]) -> None:
        # Records of workers older than the per-queue field count for every queue.
        mine = [r for r in records if r.get("queue", self._queue) == self._queue]
        with self._lock:
            self._records = mine
            self._answers = {}
            self._count = max(1, len(mine))
            self._read_at = time.monotonic()

    def _refresh_if_stale(self) -> None:
        if time.monotonic() - self._read_at > self._refresh_s and not self._wanted.is_set():
            self._start()
            self._wanted.set()

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
                self._store(serving_records(self._client))
            except (redis.RedisError, OSError, ValueError) as e:
                log.debug("could not read readiness records (%s); keeping %d", e, self._count)
                self._read_at = time.monotonic()  # try again after refresh_s, not at once
            self._wanted.clear()


def problem(records: list[dict[str, Any]], ref: ModelRef) -> str | None:
    """Why no record serves ``ref``, or None if one does (or nothing can be known)."""
    if not records or any("models" not in r for r in records):
        return None  # no worker up, or one older than model repositories: cannot tell
    models: dict[str, set[int]] = {}
    defaults: set[str] = set()
    for record in records:
        for name, entry in (record.get("models") or {}).items():
            models.setdefault(name, set()).update(entry.get("versions", []))
        if record.get("default_model"):
            defaults.add(record["default_model"])
    if ref.name is None:
        if not defaults:
            return (
                f"expected a model name: the workers serve {sorted(models)} and none of them is "
                "a default model (named 'default', or the only one); pass model=..."
            )
        names = defaults
    else:
        if ref.name not in models:
            return f"expected one of the served models {sorted(models)}, received {ref.name!r}"
        names = {ref.name}
    if ref.version is None:
        return None
    versions = set().union(*(models.get(n, set()) for n in names))
    if ref.version in versions:
        return None
    return (
        f"{ref.describe()}: the workers have versions {sorted(versions)} loaded, received "
        f"version {ref.version} (PREDICTQ_MODEL_KEEP_VERSIONS says how many stay loaded)"
    )

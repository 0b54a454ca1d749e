"""Fail fast on a model the workers do not serve: the producer's view of the served models.

Every serving worker process says in its readiness record (predictq/readiness.py)
which models and versions it has loaded and its default model. Before a job
is published, ``ServedModels.check`` looks there (records cached for
``cache_s``; a miss is read again once, fresh, so a version loaded a moment ago
is not refused) and raises ``UnknownModel`` if no worker of the client's queue
serves the model, or the pinned version. When no worker at all is up there is
nothing to check against: the job is queued as usual and the first worker to
start answers it (with ``UnknownModel`` itself, if it lacks the model). A worker
that gets a job it cannot serve answers ``UnknownModel`` too, so no job waits
in a queue for a model nobody has.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from predictq.errors import UnknownModel
from predictq.modelref import ModelRef
from predictq.readiness import serving_records


class ServedModels:
    """What the serving workers of one queue have loaded, read from their readiness records."""

    def __init__(self, client: redis.Redis, queue: str, *, cache_s: float = 1.0) -> None:
        self._client = client
        self._queue = queue
        self._cache_s = cache_s
        self._lock = threading.Lock()  # one refresh at a time; guards the two fields below
        self._read_at = -float("inf")
        self._records: list[dict[str, Any]] = []
        # The answer per reference for the records read last (a submit costs a dict lookup).
        self._answers: dict[ModelRef, str | None] = {}

    def check(self, ref: ModelRef) -> None:
        """Raise ``UnknownModel`` if workers are up and none of them serves ``ref``."""
        if self._problem(ref, fresh=False) is None:
            return
        problem = self._problem(ref, fresh=True)
        if problem is not None:
            raise UnknownModel(problem)

    def _problem(self, ref: ModelRef, *, fresh: bool) -> str | None:
        with self._lock:
            now = time.monotonic()
            if fresh or now - self._read_at > self._cache_s:
                try:
                    records = serving_records(self._client)
                except (redis.ConnectionError, redis.TimeoutError):
                    # Cannot look: let the job go; the worker checks it anyway.
                    return None
                self._records = [r for r in records if r.get("queue", self._queue) == self._queue]
                self._read_at = now
                self._answers = {}
            if ref not in self._answers:
                self._answers[ref] = _problem(self._records, ref)
            return self._answers[ref]


def _problem(records: list[dict[str, Any]], ref: ModelRef) -> str | None:
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

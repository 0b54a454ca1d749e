"""The model versions a worker process serves, and which one each new job gets.

A ``ServedVersion`` is one loaded and warmed model version: the batcher's
``run`` for its jobs (workers/batcher.py batches each version apart). The
registry routes a job to a version and holds it for the job (a lease) from
validation until its outputs are back; a version hot-loaded beside it takes the
new jobs at once, and one that is retired (replaced, beyond the newest
``PREDICTQ_MODEL_KEEP_VERSIONS``, or removed from disk) leaves the routing at
once but is released only when its last leased job has its outputs: jobs
already on a version finish on it, and none waits for a load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from predictq.errors import UnknownModel
from predictq.modelref import DEFAULT_MODEL, ModelRef
from workers.model import LoadedModel

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


class ServedVersion:
    """One loaded, warm version of a model; calling it runs one batch (device thread only)."""

    def __init__(self, name: str, version: int, model: LoadedModel, stamp: object) -> None:
        self.name = name
        self.version = version
        self.model = model
        #: Identifies the directory it was loaded from (workers/repository.py).
        self.stamp = stamp
        #: Metric labels of its batches.
        self.labels = (name, str(version))
        #: Set once, under the registry's lock, when it is let go.
        self.released = False

    def __call__(self, inputs: Sequence[Array]) -> list[Array]:
        return self.model(inputs)

    def __repr__(self) -> str:
        return f"<ServedVersion {self.name} v{self.version}>"


class ModelRegistry:
    """Routes jobs to served versions; releases retired versions once their jobs are done."""

    def __init__(self, *, on_release: Callable[[ServedVersion], None] | None = None) -> None:
        self._on_release = on_release
        # _lock guards the three maps. Invariants: a version is in _routing or
        # in _retiring, never both; a leased version's count in _leases is > 0
        # until its job's outputs are back; a retired version is released
        # (dropped, on_release called) exactly once, when its count is 0.
        self._lock = threading.Lock()
        self._routing: dict[str, dict[int, ServedVersion]] = {}
        self._retiring: dict[int, ServedVersion] = {}  # by id()
        self._leases: dict[int, int] = {}  # id() -> jobs holding it

    def add(self, served: ServedVersion) -> ServedVersion | None:
        """Serve ``served`` to new jobs; returns the version it replaces (same number), retired."""
        with self._lock:
            versions = self._routing.setdefault(served.name, {})
            replaced = versions.get(served.version)
            versions[served.version] = served
        if replaced is not None:
            self.retire(replaced)
        return replaced

    def retire(self, served: ServedVersion) -> None:
        """Take ``served`` out of routing; released once its leased jobs are done."""
        with self._lock:
            versions = self._routing.get(served.name, {})
            if versions.get(served.version) is served:
                del versions[served.version]
                if not versions:
                    del self._routing[served.name]
            if served.released:
                return
            if self._leases.get(id(served), 0) > 0:
                self._retiring[id(served)] = served
                return
            served.released = True
        self._release(served)

    @contextmanager
    def lease(self, ref: ModelRef) -> Iterator[ServedVersion]:
        """The version that serves a job for ``ref``, held for the ``with`` block.

        Raises ``UnknownModel`` if this process does not serve it.
        """
        with self._lock:
            served = self._route(ref)
            self._leases[id(served)] = self._leases.get(id(served), 0) + 1
        try:
            yield served
        finally:
            with self._lock:
                left = self._leases[id(served)] - 1
                if left:
                    self._leases[id(served)] = left
                    released = None
                else:
                    del self._leases[id(served)]
                    released = self._retiring.pop(id(served), None)
                    if released is not None:
                        released.released = True
            if released is not None:
                self._release(released)

    def served(self) -> dict[str, list[ServedVersion]]:
        """The versions new jobs can get, by model name, oldest first."""
        with self._lock:
            return {
                name: [versions[v] for v in sorted(versions)]
                for name, versions in sorted(self._routing.items())
            }

    def retiring(self) -> list[ServedVersion]:
        """Versions out of routing whose jobs have not all finished yet."""
        with self._lock:
            return list(self._retiring.values())

    def describe(self) -> dict[str, Any]:
        """What this process serves, for its readiness record (and so for producers)."""
        with self._lock:
            default = self._default_name()
            routing = {name: dict(versions) for name, versions in self._routing.items()}
        models = {}
        for name in sorted(routing):
            versions = [routing[name][v] for v in sorted(routing[name])]
            models[name] = {
                "versions": [v.version for v in versions],
                "spec": versions[-1].model.spec.as_dict(),
            }
        return {
            # The default model's newest version (what a job without `model` gets).
            "model": models[default]["spec"] if default else None,
            "default_model": default,
            "models": models,
        }

    def default_name(self) -> str | None:
        """The model a job without ``model`` gets: ``default`` if served, else the only one."""
        with self._lock:
            return self._default_name()

    def _default_name(self) -> str | None:
        if DEFAULT_MODEL in self._routing:
            return DEFAULT_MODEL
        if len(self._routing) == 1:
            return next(iter(self._routing))
        return None

    def _route(self, ref: ModelRef) -> ServedVersion:
        name = ref.name if ref.name is not None else self._default_name()
        served = sorted(self._routing)
        if name is None:
            raise UnknownModel(
                f"job: expected a model name (this worker serves {served}, none named "
                f"{DEFAULT_MODEL!r}), received none; pass model=..."
            )
        versions = self._routing.get(name)
        if not versions:
            raise UnknownModel(f"job: expected one of the models {served}, received {name!r}")
        if ref.version is None:
            return versions[max(versions)]
        found = versions.get(ref.version)
        if found is None:
            raise UnknownModel(
                f"job: model {name!r} has versions {sorted(versions)} loaded, received "
                f"version {ref.version} (PREDICTQ_MODEL_KEEP_VERSIONS says how many of the "
                "newest stay loaded)"
            )
        return found

    def _release(self, served: ServedVersion) -> None:
        log.info("model %s version %d released", served.name, served.version)
        if self._on_release is not None:
            self._on_release(served)

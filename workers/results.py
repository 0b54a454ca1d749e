"""What a job's caller reads back: JSON for JSON jobs, and no server internals.

Celery's Redis result backend encodes every result with the app's one
``result_serializer`` and Redis stores no content type next to it, so a client
that sent JSON (celery-node, Celery's default Python client, any JSON Celery
client) could not read a msgpack result. The choice is made per job instead:

* the consumer (``workers.consumer``) marks every message it hands to Celery
  with the header ``JSON_RESULT``: true unless the message is msgpack. Celery
  copies message headers into the task's request, so the task and this backend
  read the mark there, and Celery's own failure paths (a lost worker, a revoked
  job) carry it too;
* the task returns a JSON job's outputs ready for JSON (``json_outputs``): nested
  lists, or ndarray maps with base64 data if the job sent ndarray maps or a
  stored payload;
* ``ResultBackend`` stores a JSON job's record, whatever its state, with
  kombu's JSON encoder (Celery's own JSON serializer) in Celery's usual shape;
  every other record with the app's msgpack serializer, as before.

A successful record also holds ``model_version`` (top level, beside Celery's
``status`` and ``result``): the version of the model that computed it, which the
task puts on its request (``set_model_version``) and ``ResultBackend`` copies
into every record it builds, so ``result`` stays what every client reads.

A failure record holds the error's type, module and message. The worker's
traceback (its file paths and code) stays in the worker's log unless
``PREDICTQ_RESULT_TRACEBACKS`` is on.
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import pybase64
from celery import states
from celery.app.task import Context
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils import json as kombu_json

from predictq.codec import CONTENT_TYPE, NDARRAY_KEY, check_dtype, loads_result
from predictq.errors import PredictionError, PredictqError
from predictq.modelref import MODEL_VERSION_FIELD
from predictq.packed import Command, execute_packed
from predictq.payloads import REF_KEY
from predictq.sentinel import is_sentinel_url

#: Message header (then request attribute) set by the consumer: store a JSON result.
JSON_RESULT: Final = "predictq_json_result"
#: Request attribute: the model version that computed the job's result.
MODEL_VERSION_ATTR: Final = "predictq_model_version"
#: Celery configuration key read by ``ResultBackend`` (set from PREDICTQ_RESULT_TRACEBACKS).
TRACEBACKS_CONF: Final = "predictq_result_tracebacks"

# True while ResultBackend.store_result stores a JSON job's record (per thread:
# the threads pool stores results on the job's own thread).
_storing_json: ContextVar[bool] = ContextVar("predictq_storing_json", default=False)


def wants_json(content_type: object) -> bool:
    """Whether a message with ``content_type`` gets a JSON result: every kind but msgpack."""
    return content_type != CONTENT_TYPE


def refusal_request(content_type: object) -> Context:
    """The request to store a refused message's failure with (it never became a task)."""
    return Context({JSON_RESULT: wants_json(content_type)})


@dataclass(frozen=True)
class JobOutcome:
    """One job of a coalesced message, answered: what ``store_job_outcomes`` stores."""

    job_id: str
    #: The job's outputs (already JSON-ready for a JSON job), or its exception.
    outcome: object
    json_result: bool
    model_version: int | None = None


def store_job_outcomes(backend: Any, outcomes: Sequence[JobOutcome]) -> None:
    """Store jobs of a coalesced message under their own ids, as single jobs' tasks would.

    Each record is what Celery writes for a ``predictq.predict`` task (the same
    backend, state, encoding and expiry), so every reader of single-job results
    reads it unchanged; ``backend`` is the worker's ``ResultBackend``, which
    stores them all in one or two round trips (``store_outcomes``).
    """
    if outcomes:
        backend.store_outcomes(outcomes)


def set_model_version(request: Any, version: int) -> None:
    """Record on the task's request which version computed its result (stored with it)."""
    setattr(request, MODEL_VERSION_ATTR, version)


def sent_ndarray_maps(raw: object) -> bool:
    """Whether a job's input used ndarray maps (or a stored payload) rather than nested lists."""
    if isinstance(raw, dict):
        if NDARRAY_KEY in raw or REF_KEY in raw:
            return True
        values: list[object] = list(raw.values())
    elif isinstance(raw, list | tuple):
        values = list(raw)
    else:
        return False
    return any(isinstance(v, dict) and NDARRAY_KEY in v for v in values)


def json_outputs(value: object, *, as_maps: bool, where: str = "output") -> object:
    """A prediction (an array, a list or a dict of them) as JSON-ready values.

    Arrays become nested lists, or with ``as_maps`` ndarray maps with base64
    data (raw bytes, C order, the dtype's byte order as in ``dtype``).
    """
    if isinstance(value, np.ndarray):
        return _ndarray_map(value) if as_maps else _nested_lists(value, where)
    if isinstance(value, dict):
        return {
            str(k): json_outputs(v, as_maps=as_maps, where=f"output {k!r}")
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [json_outputs(v, as_maps=as_maps, where=f"output {i}") for i, v in enumerate(value)]
    return value


def _ndarray_map(array: np.ndarray[Any, Any]) -> dict[str, object]:
    check_dtype(array.dtype)
    contiguous = np.ascontiguousarray(array)
    return {
        NDARRAY_KEY: 1,
        "dtype": contiguous.dtype.str,
        "shape": list(contiguous.shape),
        "data": pybase64.b64encode(contiguous.tobytes()).decode("ascii"),
    }


def _nested_lists(array: np.ndarray[Any, Any], where: str) -> object:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        # Python's json would write NaN/Infinity, which JSON parsers elsewhere
        # (JSON.parse, most languages) refuse: the caller could not read its result.
        raise PredictionError(
            f"{where}: holds NaN or infinity, which JSON numbers cannot carry; send the input "
            "as ndarray maps (base64) to receive the output as one"
        )
    return array.tolist()


class _PredictqRecords:
    """predictq's change to Celery's Redis backends: JSON records for JSON jobs, no tracebacks."""

    def __init__(self, app: Any, url: str | None = None, **kwargs: Any) -> None:
        # Named by class (the app's ``backend_cls``), so Celery passes no URL.
        super().__init__(app=app, url=url or app.conf.result_backend, **kwargs)  # type: ignore[call-arg]
        self._tracebacks = bool(app.conf.get(TRACEBACKS_CONF, False))

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not self._tracebacks:
            traceback = None
        if not getattr(request, JSON_RESULT, False):
            return super().store_result(  # type: ignore[misc]
                task_id, result, state, traceback, request, **kwargs
            )
        token = _storing_json.set(True)
        try:
            return super().store_result(  # type: ignore[misc]
                task_id, result, state, traceback, request, **kwargs
            )
        finally:
            _storing_json.reset(token)

    def _get_result_meta(
        self,
        result: Any,
        state: str,
        traceback: str | None,
        request: Any,
        format_date: bool = True,
        encode: bool = False,
    ) -> dict[str, Any]:
        # Celery 5.7 builds every stored record here (celery/backends/base.py),
        # success and failure alike: the one place to add a field to all of them.
        meta: dict[str, Any] = super()._get_result_meta(  # type: ignore[misc]
            result, state, traceback, request, format_date, encode
        )
        version = getattr(request, MODEL_VERSION_ATTR, None)
        if isinstance(version, int):
            meta[MODEL_VERSION_FIELD] = version
        return meta

    def store_outcomes(self, outcomes: Sequence[JobOutcome]) -> None:
        """Store many jobs' records: one pipeline of SET and PUBLISH (and an MGET before
        it only when some of them are failures).

        Celery's ``store_result`` costs two round trips per job (it reads the
        stored record first, then writes it and publishes it): for a message of
        a dozen jobs those sequential round trips, not the model, were most of
        the worker's time. The rules stay Celery's (celery/backends/base.py
        ``_store_result``, redis.py ``_set``) where they matter: a stored
        SUCCESS is never overwritten by a failure (a redelivered job must not
        turn its answer into a failure), so a failure is written only after an
        MGET found no SUCCESS under its key; a success is written without that
        read: over a stored SUCCESS it writes the same pure prediction again (a
        record consistent with itself if a new model version computed it), and
        the read cost every message a round trip on the path to its callers.
        A failure expires after ``result_failure_expires``; each record is
        written before it is published, on one connection, so a subscriber that
        reads the key on the message finds it. The retries are Celery's too:
        the backend's retry policy around each round trip, then
        ``result_backend_always_retry`` around the whole.
        """
        # A success's record differs from another's of the same message only in
        # its result, id and model version (the format is the encoder's): Celery
        # builds the first (with a version, and without), the others copy it.
        templates: dict[bool, dict[str, Any]] = {}
        records = [self._record(o, templates) for o in outcomes]
        self._ensure_retryable(  # type: ignore[attr-defined]
            self._store_records,
            records,
            fallback_exc=BackendStoreError,
            fallback_msg="failed to store results on the backend",
        )

    def _record(
        self, o: JobOutcome, templates: dict[bool, dict[str, Any]]
    ) -> tuple[str, str | bytes, str]:
        kind = o.model_version is not None
        outcome = o.outcome
        for _ in range(2):
            failed = isinstance(outcome, BaseException)
            state = states.FAILURE if failed else states.SUCCESS
            token = _storing_json.set(o.json_result)
            try:
                result = self.encode_result(outcome, state)  # type: ignore[attr-defined]
                template = None if failed else templates.get(kind)
                if template is not None:
                    meta = {**template, "result": result, "task_id": o.job_id}
                    if o.model_version is not None:
                        meta[MODEL_VERSION_FIELD] = o.model_version
                else:
                    meta = self._meta(o, result, state, outcome)
                    if not failed:
                        templates[kind] = meta
                value = self.encode(meta)
            finally:
                _storing_json.reset(token)
            limit = self._MAX_STR_VALUE_SIZE  # type: ignore[attr-defined]
            if not (isinstance(value, str) and len(value) > limit):
                break
            # Where Celery would fail the whole store: this job alone fails, and says why.
            outcome = PredictionError(
                f"the result is {len(value):,} characters long; the Redis result backend "
                f"stores at most {limit:,}: send fewer samples per job"
            )
        key = self.get_key_for_task(o.job_id)  # type: ignore[attr-defined]
        return key, value, state

    def _meta(self, o: JobOutcome, result: Any, state: str, outcome: object) -> dict[str, Any]:
        """The record Celery builds for ``o``'s task with ``result`` in ``state``."""
        request = Context({JSON_RESULT: o.json_result, "id": o.job_id})
        if o.model_version is not None:
            set_model_version(request, o.model_version)
        trace = None
        if isinstance(outcome, BaseException) and self._tracebacks:
            trace = "".join(tb.format_exception(outcome))
        meta: dict[str, Any] = self._get_result_meta(result, state, trace, request)
        meta["task_id"] = o.job_id
        return meta

    def _store_records(self, records: list[tuple[str, str | bytes, str]]) -> None:
        failures = [key for key, _, state in records if state == states.FAILURE]
        kept: set[str] = set()
        if failures:
            stored = self.ensure(self.mget, (failures,))  # type: ignore[attr-defined]
            kept = {k for k, current in zip(failures, stored, strict=True) if _succeeded(current)}
        writes = [r for r in records if r[0] not in kept]
        if writes:
            self.ensure(self._set_many, (writes,))  # type: ignore[attr-defined]

    def _set_many(self, writes: list[tuple[str, str | bytes, str]]) -> None:
        # Not a MULTI: each job's SET comes before its PUBLISH on one connection
        # anyway, and jobs need no atomicity with each other.
        commands: list[Command] = []
        for key, value, state in writes:
            expires = self.failure_expires if state == states.FAILURE else self.expires  # type: ignore[attr-defined]
            # SET EX, as Celery's SETEX (the same effect).
            ttl_s = int(expires) if expires else 0
            commands.append(("SET", key, value, "EX", ttl_s) if ttl_s else ("SET", key, value))
            commands.append(("PUBLISH", key, value))
        execute_packed(self.client, commands)  # type: ignore[attr-defined]

    def encode(self, data: Any) -> Any:
        if _storing_json.get():
            # What Celery's JSON result serializer writes.
            return kombu_json.dumps(data)  # type: ignore[no-untyped-call]
        return super().encode(data)  # type: ignore[misc]


def _succeeded(stored: bytes | None) -> bool:
    """Whether a stored record (JSON or msgpack) says SUCCESS; an unreadable one does not."""
    if stored is None:
        return False
    try:
        record = loads_result(stored)
    except (PredictqError, ValueError, TypeError):
        return False
    return isinstance(record, dict) and record.get("status") == states.SUCCESS


class ResultBackend(_PredictqRecords, RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend with predictq's records."""


class SentinelResultBackend(_PredictqRecords, SentinelBackend):  # type: ignore[misc]
    """Celery's Redis Sentinel result backend with predictq's records."""


def result_backend(app: Any, url: str | None = None, **kwargs: Any) -> RedisBackend:
    """The workers' result backend for ``app``'s ``result_backend`` URL (the app's backend_cls).

    Celery uses ``backend_cls`` whatever the URL's scheme says, and creates it
    only once the configuration is read, so the choice is made here, then.
    """
    url = url or app.conf.result_backend
    cls = SentinelResultBackend if is_sentinel_url(url) else ResultBackend
    return cls(app=app, url=url, **kwargs)

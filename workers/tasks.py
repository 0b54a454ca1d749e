"""The tasks a worker serves. Task name, arguments and result are the wire contract.

``predictq.predict(inputs, model=None, version=None)``: the model input (one
array, a list of arrays in input order, or a dict by input name), positional or
``inputs=``; optionally the model's name and a pinned version as keyword
arguments (predictq/modelref.py; absent: the default model, newest version).
Returns the model's output in the model's own structure (one array, a list, or
a dict by name); for a job that arrived as JSON, in a form JSON carries
(``workers.results``). The stored result also says which version computed it
(``model_version``, workers/results.py).

``predictq.predict_jobs(entries)``: several jobs in one message
(predictq/carrier.py, run by workers/carriers.py); each job's result is stored
under its own id (with its ``model_version``), and the message's own result
is a count of them. Entries name their model like the kwargs above.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.utils.time import maybe_iso8601, maybe_make_aware

from predictq.celeryconf import NOOP_TASK, PREDICT_JOBS_TASK, PREDICT_TASK, SENT_AT_HEADER
from predictq.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    InvalidInput,
    ModelNotReady,
    PoisonJob,
    PredictqError,
    Requeue,
)
from predictq.modelref import KEYS as MODEL_KEYS
from predictq.modelref import ModelRef, job_model
from workers import metrics
from workers.app import app
from workers.carriers import run_carrier
from workers.lifecycle import current_runtime
from workers.requests import DecodedPayloadRequest, PredictRequest, record_served
from workers.results import JSON_RESULT, json_outputs, sent_ndarray_maps, set_model_version
from workers.runtime import JobContext


class PredictTask(Task):  # type: ignore[misc]
    """Base of the prediction task: late acks, typed errors, metrics."""

    # Expected, caller-caused outcomes: Celery logs them without a traceback.
    throws = (InvalidInput, DeadlineExceeded, PoisonJob, DeviceOutOfMemory)  # UnknownModel too
    acks_late = True
    # Predictions are pure: re-running a job whose worker died is safe.
    reject_on_worker_lost = True
    typing = False
    # Its succeeded event names the model version, for Flower (workers/requests.py).
    Request = PredictRequest

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        metrics.JOBS.labels(outcome="success", error_type="").inc()
        _forget_payload(args, kwargs, task_id)

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        metrics.JOBS.labels(outcome="failure", error_type=type(exc).__name__).inc()
        # A final outcome: the input is not needed again. Not for a lost worker
        # (prefork): that job is requeued and will read its input again.
        if isinstance(exc, PredictqError) and not exc.retryable:
            _forget_payload(args, kwargs, task_id)


def _forget_payload(args: Any, kwargs: Any, task_id: str) -> None:
    # Wherever the input was passed (positional or `inputs=`), even by a call
    # with the wrong arguments: a payload it references is not needed again.
    candidates = list(args or ())[:1]
    if isinstance(kwargs, dict) and "inputs" in kwargs:
        candidates.append(kwargs["inputs"])
    with contextlib.suppress(ModelNotReady, Requeue):
        runtime = current_runtime()
        for raw in candidates:
            runtime.forget_payload(raw, task_id)


def _the_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[object, ModelRef]:
    """The job's input and model reference; InvalidInput for any other arguments."""
    extra = set(kwargs) - MODEL_KEYS
    if len(args) == 1 and not extra:
        return args[0], job_model(kwargs, where=PREDICT_TASK)
    if not args and extra == {"inputs"}:
        return kwargs["inputs"], job_model(kwargs, where=PREDICT_TASK)
    raise InvalidInput(
        f"{PREDICT_TASK}: expected exactly one argument `inputs`, received {len(args)} "
        f"positional argument(s) and keyword arguments {sorted(kwargs)}; the only other "
        f"keyword arguments are {sorted(MODEL_KEYS)}"
    )


def _context(request: Any) -> JobContext:
    delivery_info = request.delivery_info or {}
    deadline = None
    expires = request.expires
    if expires:
        # Celery already parsed and validated this header when it built the
        # request (a malformed one is refused before the task runs).
        when = maybe_make_aware(maybe_iso8601(expires))
        remaining_s = when.timestamp() - time.time()
        deadline = time.monotonic() + remaining_s
    # Protocol-2 message headers become attributes of the request context.
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if isinstance(sent_at, int | float):
        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - sent_at))
    return JobContext(
        task_id=request.id,
        redelivered=bool(delivery_info.get("redelivered")),
        deadline=deadline,
    )


def _predict(self: PredictTask, *args: Any, **kwargs: Any) -> object:
    """Predict the model's output for ``inputs``."""
    raw, ref = _the_input(args, kwargs)
    metrics.MESSAGE_JOBS.observe(1)
    try:
        runtime = current_runtime()
        prediction = runtime.predict(raw, _context(self.request), ref)
    except (ModelNotReady, Requeue) as e:
        # Not loaded yet, stopping, or Redis is restarting: hand the job back to
        # the queue (if Redis cannot take it back now, the visibility timeout
        # redelivers it). Predictions are pure, so running it again is safe.
        raise Reject(str(e), requeue=True) from e
    set_model_version(self.request, prediction.version)
    record_served(self.request.id, prediction.model, prediction.version)
    outputs = prediction.outputs
    if getattr(self.request, JSON_RESULT, False):
        # A JSON client gets the form it sent: nested lists, or ndarray maps.
        return json_outputs(outputs, as_maps=sent_ndarray_maps(raw))
    return outputs


class CarrierTask(Task):  # type: ignore[misc]
    """Base of the coalesced-message task: late acks; jobs are counted one by one."""

    Request = DecodedPayloadRequest
    throws = (InvalidInput,)
    acks_late = True
    reject_on_worker_lost = True
    typing = False


def _predict_jobs(self: CarrierTask, *args: Any, **kwargs: Any) -> dict[str, object]:
    """Predict every job of a coalesced message; each result under the job's own id."""
    if len(args) != 1 or kwargs or not isinstance(args[0], list) or not args[0]:
        # The message guard refuses these first; a direct call may still try.
        raise InvalidInput(
            f"{PREDICT_JOBS_TASK}: expected exactly one argument, a non-empty list of job "
            f"entries, received {len(args)} positional argument(s) and keyword arguments "
            f"{sorted(kwargs)}"
        )
    return run_carrier(args[0], self.request, self.backend)


def _noop(*args: Any, **kwargs: Any) -> None:
    """Do nothing: the per-message ceiling of the queue (used by the benchmark)."""
    return None


# Registered explicitly: Celery's decorator is untyped.
predict: Task = app.task(bind=True, base=PredictTask, name=PREDICT_TASK)(_predict)
predict_jobs: Task = app.task(bind=True, base=CarrierTask, name=PREDICT_JOBS_TASK)(_predict_jobs)
noop: Task = app.task(name=NOOP_TASK, acks_late=True)(_noop)

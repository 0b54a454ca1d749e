"""One coalesced message (``predictq.predict_jobs``): many jobs, each answered on its own.

The wire contract is predictq/carrier.py. Each job reads, for its caller, as
if it had come in its own ``predictq.predict`` message:

* an entry that is not a valid job fails alone with ``InvalidInput`` (stored
  under its id when it has a readable one), its neighbours run;
* the others run through ``Runtime.predict_groups``: together in the batcher on
  a first delivery, one by one as counted suspects once redelivered (poison
  isolation, workers/deliveries.py);
* each outcome is stored under the job's own id as soon as it is known, with
  the others ready at the same moment in one round trip
  (``store_job_outcomes``), counted in ``predictq_jobs``, and its stored input
  (payload by reference) deleted once final.

A retryable error (model not ready, worker stopping, Redis restarting) sends
the whole message back to the queue: the jobs not yet answered run again on
redelivery, the answered ones again too (a pure prediction, stored again under
the same id). Any other unexpected error fails the jobs not yet answered before
the message fails, so that no caller waits for a result that never comes.
The message is acknowledged (late) after all of that.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from celery.exceptions import Reject

from predictq.carrier import Entry, entry_id, parse_entry
from predictq.celeryconf import SENT_AT_HEADER
from predictq.errors import InvalidInput, ModelNotReady, PredictionError, PredictqError, Requeue
from workers import metrics
from workers.lifecycle import current_runtime
from workers.results import (
    JSON_RESULT,
    JobOutcome,
    json_outputs,
    sent_ndarray_maps,
    store_job_outcomes,
)
from workers.runtime import JobContext, Prediction, Runtime

log = logging.getLogger(__name__)


def run_carrier(raw_entries: list[Any], request: Any, backend: Any) -> dict[str, object]:
    """Run every job of one message; the message's own result is a summary."""
    metrics.MESSAGE_JOBS.observe(len(raw_entries))
    sent_at = getattr(request, SENT_AT_HEADER, None)
    if isinstance(sent_at, int | float) and not isinstance(sent_at, bool):
        metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - sent_at))
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    answer = _Answer(backend, json_result=bool(getattr(request, JSON_RESULT, False)))
    entries = _parsed(raw_entries, answer)
    jobs = [(e.inputs, _context(e, redelivered), e.ref) for e in entries]
    try:
        runtime = current_runtime()
        answer.runtime = runtime
        waiting = iter(entries)
        for group in runtime.predict_groups(jobs):
            answer.jobs([(next(waiting), outcome) for outcome in group])
    except (ModelNotReady, Requeue) as e:
        # As for a single job (workers/tasks.py): back to the queue, pure jobs.
        raise Reject(str(e), requeue=True) from e
    except Exception as e:
        error = PredictionError(f"the worker failed running a coalesced message: {e!r}")
        try:
            unanswered = [e for e in entries if e.job_id not in answer.answered]
            answer.jobs([(entry, error) for entry in unanswered])
        except Exception:
            # The result backend itself fails: lost-job recovery (producer)
            # republishes what has no result once the message is gone.
            log.exception("could not store the failures of a coalesced message's jobs")
        raise
    return {
        "jobs": len(raw_entries),
        "succeeded": answer.succeeded,
        "failed": answer.failed,
        # Which versions computed them (Flower shows this summary as the row's result).
        "models": {name: sorted(versions) for name, versions in sorted(answer.models.items())},
    }


def _parsed(raw_entries: list[Any], answer: _Answer) -> list[Entry]:
    entries: list[Entry] = []
    refused: list[JobOutcome] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_entries):
        try:
            entry = parse_entry(raw, index)
        except InvalidInput as e:
            job_id = entry_id(raw)
            if job_id is None or job_id in seen:
                log.warning("coalesced message: %s (no job id to answer)", e)
                answer.failed += 1
            else:
                seen.add(job_id)
                refused.append(answer.outcome(job_id, e))
            continue
        if entry.job_id in seen:
            # One id, one result key: a second entry would overwrite the first's.
            log.warning("coalesced message: job %s appears twice; run once", entry.job_id)
            answer.failed += 1
            continue
        seen.add(entry.job_id)
        entries.append(entry)
    answer.stored(refused, inputs=[None] * len(refused))
    return entries


def _context(entry: Entry, redelivered: bool) -> JobContext:
    return JobContext(
        task_id=entry.job_id, redelivered=redelivered, deadline=_monotonic(entry.expires_at)
    )


def _monotonic(when: datetime | None) -> float | None:
    if when is None:
        return None
    return time.monotonic() + (when.timestamp() - time.time())


class _Answer:
    """Stores each job's outcome under its own id, and counts them."""

    def __init__(self, backend: Any, *, json_result: bool) -> None:
        self._backend = backend
        self._json = json_result
        self.runtime: Runtime | None = None
        self.answered: set[str] = set()
        self.succeeded = 0
        self.failed = 0
        #: Model name -> the versions that computed this message's successful jobs.
        self.models: dict[str, set[int]] = {}

    def outcome(self, job_id: str, outcome: object, model_version: int | None = None) -> JobOutcome:
        return JobOutcome(job_id, outcome, self._json, model_version)

    def jobs(self, answered: list[tuple[Entry, Prediction | BaseException]]) -> None:
        """Store the outcomes of jobs that are ready together, in one round trip."""
        outcomes: list[JobOutcome] = []
        for entry, outcome in answered:
            if isinstance(outcome, BaseException):
                outcomes.append(self.outcome(entry.job_id, outcome))
                continue
            outputs = outcome.outputs
            if self._json:
                try:
                    outputs = json_outputs(outputs, as_maps=sent_ndarray_maps(entry.inputs))
                except PredictqError as e:
                    outcomes.append(self.outcome(entry.job_id, e))
                    continue
            outcomes.append(self.outcome(entry.job_id, outputs, outcome.version))
            self.models.setdefault(outcome.model, set()).add(outcome.version)
        self.stored(outcomes, inputs=[entry.inputs for entry, _ in answered])

    def stored(self, outcomes: list[JobOutcome], *, inputs: list[object]) -> None:
        store_job_outcomes(self._backend, outcomes)
        succeeded = 0
        for o, raw in zip(outcomes, inputs, strict=True):
            self.answered.add(o.job_id)
            if isinstance(o.outcome, BaseException):
                self.failed += 1
                metrics.JOBS.labels(outcome="failure", error_type=type(o.outcome).__name__).inc()
            else:
                succeeded += 1
            # A final outcome: the job's stored input is not needed again.
            if self.runtime is not None and raw is not None:
                self.runtime.forget_payload(raw, o.job_id)
        if succeeded:
            # One labelled child lookup per group, not per job.
            self.succeeded += succeeded
            metrics.JOBS.labels(outcome="success", error_type="").inc(succeeded)

"""One job through a worker process: input, poison-job guard, batcher, output.

The task (workers/tasks.py) calls ``Runtime.predict`` on its own pool thread.
Every Redis round trip a job needs (its input, when it travelled by reference;
the attempt count of a redelivered job) happens here, on that thread, before
the job is handed to the batcher or after its result is back: the batcher's
device thread only computes, so a slow Redis delays the jobs that need it and
no others. workers/lifecycle.py builds the runtime when the process starts
serving and takes it down when it stops.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import redis

from predictq import payloads
from predictq.errors import PredictqError, Requeue
from predictq.settings import Settings
from workers.batcher import Array, Batcher
from workers.deliveries import DeliveryTracker
from workers.model import LoadedModel
from workers.validation import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What a task knows about its message, beyond the input."""

    task_id: str
    redelivered: bool
    deadline: float | None  # time.monotonic() instant


class Runtime:
    """A loaded model serving predictions through one batcher."""

    def __init__(
        self,
        model: LoadedModel,
        batcher: Batcher,
        *,
        settings: Settings,
        broker: redis.Redis,
        deliveries: DeliveryTracker,
    ) -> None:
        self.model = model
        self.batcher = batcher
        self.settings = settings
        self._broker = broker  # referenced inputs live next to the queue
        self._deliveries = deliveries
        # Held by a redelivered job from its attempt count until its result is
        # back. Invariant: at most one counted suspect is in the batcher, so a
        # process death is blamed on the one that ran (workers/deliveries.py).
        self._suspect = threading.Lock()

    def predict(self, raw: object, job: JobContext) -> object:
        """Validate, batch, run and restructure one job's prediction."""
        if job.redelivered:
            # Its worker may have died running it: count the attempt and run it
            # alone (not announced: it never joins another job's batch).
            outputs = self._run_suspect(self._validated(raw, job.task_id), job)
        else:
            with self.batcher.announce():
                arrays = self._validated(raw, job.task_id)
                future = self.batcher.submit(arrays, deadline=job.deadline)
            outputs = future.result()
        return self.model.spec.structure_outputs(outputs)

    def predict_each(
        self, jobs: Sequence[tuple[object, JobContext]]
    ) -> Iterator[object | PredictqError]:
        """Each job's outputs, or its own final error, in order, as each is ready.

        The jobs of one message (workers/carriers.py). First deliveries are
        validated and submitted together, so they share device calls. Once
        redelivered, the message may hold a job that kills its worker, so each
        job runs as a suspect, one at a time, counted under its own id: the
        poison one reaches ``max_deliveries`` and fails alone. Retryable errors
        (``Requeue``, ``ModelNotReady``) are raised: the whole message goes back.
        """
        if any(job.redelivered for _, job in jobs):
            for raw, job in jobs:
                yield self._outcome(functools.partial(self._suspect_outputs, raw, job))
            return
        pending: list[Future[list[Array]] | PredictqError] = []
        with self.batcher.announce():
            for raw, job in jobs:
                try:
                    arrays = self._validated(raw, job.task_id)
                except PredictqError as e:
                    if e.retryable:
                        raise
                    pending.append(e)
                    continue
                pending.append(self.batcher.submit(arrays, deadline=job.deadline))
        for item in pending:
            if isinstance(item, PredictqError):
                yield item
            else:
                yield self._outcome(item.result)

    def _suspect_outputs(self, raw: object, job: JobContext) -> list[Array]:
        return self._run_suspect(self._validated(raw, job.task_id), job)

    def _outcome(self, run: Callable[[], list[Array]]) -> object | PredictqError:
        try:
            return self.model.spec.structure_outputs(run())
        except PredictqError as e:
            if e.retryable:
                raise
            return e

    def _validated(self, raw: object, task_id: str) -> list[Array]:
        return validate(
            self._resolve(raw, task_id),
            self.model.spec,
            allow_nonfinite=self.settings.allow_nonfinite,
            max_job_samples=self.settings.max_job_samples,
        )

    def _run_suspect(self, arrays: list[Array], job: JobContext) -> list[Array]:
        with self._suspect:
            self._deliveries.count_attempt(job.task_id)
            try:
                future = self.batcher.submit(arrays, deadline=job.deadline, isolated=True)
                return future.result()
            finally:
                # Back on this thread, so this process survived the job (or it
                # never ran): clear the count before the next suspect is counted.
                self._deliveries.survived(job.task_id)

    def _resolve(self, raw: object, task_id: str) -> object:
        """The job's input, read from Redis when it travelled by reference."""
        key = payloads.referenced_key(raw, task_id)
        if key is None:
            return raw
        try:
            return payloads.fetch(self._broker, key, max_bytes=self.settings.max_payload_bytes)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise Requeue(f"cannot read the job's input from Redis: {e}") from e

    def forget_payload(self, raw: object, task_id: str) -> None:
        """Delete a referenced input once its job has a final outcome (best effort)."""
        try:
            key = payloads.referenced_key(raw, task_id)
            if key is not None:
                self._broker.delete(key)
        except (redis.RedisError, PredictqError) as e:
            log.warning("could not delete a job's stored input (it expires by itself): %s", e)

"""One job through a worker process: model version, input, poison-job guard, batcher, output.

The task (workers/tasks.py) calls ``Runtime.predict`` on its own pool thread.
Every Redis round trip a job needs (its input, when it travelled by reference;
the attempt count of a redelivered job) happens here, on that thread, before
the job is handed to the batcher or after its result is back: the batcher's
device thread only computes, so a slow Redis delays the jobs that need it and
no others. The job holds its model version (a registry lease) from validation
until its outputs are back, so a version retired meanwhile finishes it first.
workers/lifecycle.py builds the runtime when the process starts serving and
takes it down when it stops.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import redis

from predictq import payloads
from predictq.errors import PredictqError, Requeue
from predictq.modelref import DEFAULT_REF, ModelRef
from predictq.settings import Settings
from workers.batcher import Array, Batcher
from workers.deliveries import DeliveryTracker
from workers.registry import ModelRegistry, ServedVersion
from workers.validation import validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobContext:
    """What a task knows about its message, beyond the input."""

    task_id: str
    redelivered: bool
    deadline: float | None  # time.monotonic() instant


@dataclass(frozen=True)
class Prediction:
    """A job's outputs (in the model's own structure) and the version that computed them."""

    outputs: object
    version: int
    #: The model's name (``default`` for PREDICTQ_MODEL_PATH).
    model: str


class Runtime:
    """The process's model versions serving predictions through one batcher."""

    def __init__(
        self,
        registry: ModelRegistry,
        batcher: Batcher,
        *,
        settings: Settings,
        broker: redis.Redis,
        deliveries: DeliveryTracker,
    ) -> None:
        self.registry = registry
        self.batcher = batcher
        self.settings = settings
        self._broker = broker  # referenced inputs live next to the queue
        self._deliveries = deliveries
        # Held by a redelivered job from its attempt count until its result is
        # back. Invariant: at most one counted suspect is in the batcher, so a
        # process death is blamed on the one that ran (workers/deliveries.py).
        self._suspect = threading.Lock()

    def predict(self, raw: object, job: JobContext, ref: ModelRef = DEFAULT_REF) -> Prediction:
        """Validate, batch, run and restructure one job's prediction on ``ref``'s version.

        Raises ``UnknownModel`` if this process does not serve that model or version.
        """
        with self.registry.lease(ref) as served:
            if job.redelivered:
                # Its worker may have died running it: count the attempt and run it
                # alone (not announced: it never joins another job's batch).
                outputs = self._run_suspect(self._validated(raw, job.task_id, served), job, served)
            else:
                with self.batcher.announce():
                    arrays = self._validated(raw, job.task_id, served)
                    future = self.batcher.submit(
                        arrays, deadline=job.deadline, run=served, labels=served.labels
                    )
                outputs = future.result()
            return Prediction(
                served.model.spec.structure_outputs(outputs), served.version, served.name
            )

    def predict_groups(
        self, jobs: Sequence[tuple[object, JobContext, ModelRef]]
    ) -> Iterator[list[Prediction | PredictqError]]:
        """Each job's prediction, or its own final error, in order, in groups as they are ready.

        The jobs of one message (workers/carriers.py). A group holds the
        outcomes that are ready together (one device call's jobs, and the
        errors found before it), so that the caller stores them in one Redis
        round trip; the next group is waited for only after. First deliveries
        are validated and submitted together, so jobs on the same model
        version share device calls. Once redelivered, the message may hold a
        job that kills its worker, so each job runs as a suspect, one at a
        time and in a group of its own, counted under its own id: the poison
        one reaches ``max_deliveries`` and fails alone, and the ones before it
        are answered before it runs. Retryable errors (``Requeue``,
        ``ModelNotReady``) are raised: the whole message goes back. Each job
        holds its version's lease until the generator is done, so a version
        retired meanwhile finishes them first.
        """
        if any(job.redelivered for _, job, _ in jobs):
            for raw, job, ref in jobs:
                yield [self._outcome(functools.partial(self.predict, raw, job, ref))]
            return
        pending: list[tuple[ServedVersion, Future[list[Array]]] | PredictqError] = []
        with contextlib.ExitStack() as leases:
            with self.batcher.announce():
                for raw, job, ref in jobs:
                    try:
                        served = leases.enter_context(self.registry.lease(ref))
                        arrays = self._validated(raw, job.task_id, served)
                    except PredictqError as e:
                        if e.retryable:
                            raise
                        pending.append(e)
                        continue
                    future = self.batcher.submit(
                        arrays, deadline=job.deadline, run=served, labels=served.labels
                    )
                    pending.append((served, future))
            group: list[Prediction | PredictqError] = []
            for item in pending:
                if group and not (isinstance(item, PredictqError) or item[1].done()):
                    yield group
                    group = []
                if isinstance(item, PredictqError):
                    group.append(item)
                else:
                    group.append(self._outcome(functools.partial(_prediction, *item)))
            if group:
                yield group

    def _outcome(self, run: Callable[[], Prediction]) -> Prediction | PredictqError:
        try:
            return run()
        except PredictqError as e:
            if e.retryable:
                raise
            return e

    def _validated(self, raw: object, task_id: str, served: ServedVersion) -> list[Array]:
        return validate(
            self._resolve(raw, task_id),
            served.model.spec,
            allow_nonfinite=self.settings.allow_nonfinite,
            max_job_samples=self.settings.max_job_samples,
        )

    def _run_suspect(
        self, arrays: list[Array], job: JobContext, served: ServedVersion
    ) -> list[Array]:
        with self._suspect:
            self._deliveries.count_attempt(job.task_id)
            try:
                future = self.batcher.submit(
                    arrays, deadline=job.deadline, isolated=True, run=served, labels=served.labels
                )
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


def _prediction(served: ServedVersion, future: Future[list[Array]]) -> Prediction:
    outputs = served.model.spec.structure_outputs(future.result())
    return Prediction(outputs, served.version, served.name)

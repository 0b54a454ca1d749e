"""The Python producer: submit prediction jobs to Redis and read results back.

``PredictionClient`` is thread-safe and meant to be shared: many threads submit
(one LPUSH each, producer/publisher.py), and one collector thread delivers
every result (producer/collector.py).

One job, top to bottom: ``submit`` checks the input once (producer/wire.py, a
``JobInput``), admits the job (deadline, size, queue length, in-flight slots),
watches for its result (collector), hands it to the coalescer
(producer/coalescer.py: alone at once, or with the jobs of other threads that
arrived during the previous publish), which publishes it (producer/sender.py,
with the input by reference when large: predictq/payloads.py), and tracks it
for lost-job recovery (recovery); the ``Job`` (producer/job.py) then waits for
what the collector delivers. Bulk calls (producer/bulk.py) go through the same ``_submit``, and so
do asyncio ones (``asubmit``, ``apredict``: producer/async_calls.py), from a few
threads of the client's own.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from predictq.celeryconf import PREDICT_TASK, celery_config
from predictq.codec import register_serializer
from predictq.errors import (
    PredictqError,
    ResultTimeout,
    TooManyInFlight,
)
from predictq.kombu_layout import queue_keys
from predictq.modelref import DEFAULT_REF, ModelRef
from predictq.redis_client import client_for
from predictq.settings import Settings
from producer import bulk, wire
from producer.admission import QueueGate, check_size
from producer.aio import SubmitPool
from producer.app import ProducerApp
from producer.async_calls import AsyncCalls
from producer.coalescer import Coalescer
from producer.collector import RESULT_KEY_PREFIX, ResultCollector
from producer.job import Job, check_timeout
from producer.publisher import RedisPublisher
from producer.recovery import LostJobRecovery
from producer.sender import Outgoing, Sender
from producer.serving import ServingView
from producer.tickets import Ticket
from producer.wire import JobInput, model_ref

log = logging.getLogger(__name__)


class PredictionClient(AsyncCalls):
    """Submits jobs to the queue and collects their results.

    Settings come from ``settings`` or the environment (``PREDICTQ_*``);
    keyword arguments override single fields, e.g.
    ``PredictionClient(broker_url="redis://h:6379/0", max_in_flight=64)``.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings if settings is not None else Settings.from_env()
        self.settings = base.replace(**overrides) if overrides else base
        register_serializer()
        self._app = ProducerApp("predictq-producer", set_as_current=False)
        self._app.conf.update(celery_config(self.settings))
        self._broker = client_for(self.settings, self.settings.broker_url)
        self._results = client_for(self.settings, self.settings.result_backend)
        self._publisher = RedisPublisher(self._app, self._broker, self.settings.queue)
        self._sender = Sender(self._publisher, self.settings)
        # Concurrent submits share messages (producer/coalescer.py); a carrier
        # stays well under the size a worker accepts (PREDICTQ_MAX_PAYLOAD_BYTES).
        # predict/apredict jobs wait to share a message while this client has
        # max_unanswered messages with no answer yet (auto: one per serving worker).
        # The serving workers' models, too: UnknownModel before sending.
        self._serving = ServingView(self._results, self.settings.queue)
        cap = self.settings.coalesce_max_unanswered
        self._coalescer: Coalescer[Outgoing] = Coalescer(
            self._sender.publish,
            max_jobs=self.settings.coalesce_max_jobs,
            max_samples=self.settings.coalesce_max_samples,
            max_bytes=min(self.settings.coalesce_max_bytes, self.settings.max_payload_bytes // 2),
            max_unanswered=(lambda: cap) if cap else self._serving.count,
            max_hold_s=self.settings.coalesce_max_hold_ms / 1000,
        )
        # Results are decoded on the collector thread, with the backend's own
        # decoder (serializer checks and exception rebuilding included).
        backend = self._app.backend
        # Task ids start with a prefix of this client's own, so that one
        # pattern subscription collects all of its results.
        self._id_prefix = f"pq-{uuid.uuid4().hex[:12]}."
        self._collector = ResultCollector(
            self._results, backend.decode_result, own_prefix=self._id_prefix
        )
        # Inputs of unfinished jobs, kept (by reference) so that a job the
        # broker loses can be published again (producer/recovery.py).
        self._unfinished: dict[str, Outgoing] = {}
        self._recovery = LostJobRecovery(
            self._broker,
            queue_keys(self.settings.queue),
            lost_after_s=self.settings.visibility_timeout_s,
            results_exist=self._results_exist,
            republish=self._republish,
        )
        self._slots = threading.BoundedSemaphore(self.settings.max_in_flight)
        self._queue = QueueGate(self._broker, self.settings, self._sender.retrying)
        self._submit_pool = SubmitPool()
        self._closed = False

    # --- submitting ------------------------------------------------------------

    def submit(
        self,
        inputs: object,
        *,
        deadline_s: float | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> Job:
        """Send one job and return at once; ``job.get()`` waits for its result.

        ``inputs``: one array (single-input models), a list of arrays in input
        order, or a dict by input name; the first dimension is the batch.
        ``deadline_s``: if the job is still queued after this many seconds it is
        not run, and ``get`` raises ``DeadlineExceeded``.
        ``model``: the model's name (default: the workers' default model);
        ``version``: pin a version (default: the newest loaded). Raises
        ``UnknownModel`` at once if the serving workers do not have it;
        ``job.model_version`` says which version computed the result.
        """
        ref = model_ref(model, version)
        return self._submit(wire.normalize(inputs), deadline_s=deadline_s, rows=None, ref=ref)

    def _submit(
        self,
        job_input: JobInput,
        *,
        deadline_s: float | None,
        rows: slice | None,
        task: str = PREDICT_TASK,
        ref: ModelRef = DEFAULT_REF,
        holdable: bool = False,
    ) -> Job:
        job, ticket = self._enqueue(
            job_input,
            deadline_s=deadline_s,
            rows=rows,
            task=task,
            waiting=True,
            ref=ref,
            holdable=holdable,
        )
        ticket.sent.result()  # the publish error, if any (its slot is free again)
        return job

    def _enqueue(
        self,
        job_input: JobInput,
        *,
        deadline_s: float | None,
        rows: slice | None,
        task: str,
        waiting: bool,
        ref: ModelRef = DEFAULT_REF,
        holdable: bool = False,
    ) -> tuple[Job, Ticket[Outgoing]]:
        """Admit one job and hand it to the coalescer; ``ticket.sent`` tells when it is out.

        ``waiting``: return only once it is published (else asyncio awaits ``sent``).
        ``holdable``: its caller waits for the result, so it may wait to share a message.
        """
        if self._closed:
            raise PredictqError("the client is closed")
        deadline_s = check_timeout("deadline_s", deadline_s)
        check_size(job_input, self.settings)
        self._serving.check(ref)
        self._queue.admit()
        if not self._slots.acquire(timeout=self.settings.submit_timeout_s):
            raise TooManyInFlight(
                f"expected at most {self.settings.max_in_flight} unfinished jobs "
                f"(max_in_flight); still full after {self.settings.submit_timeout_s:g}s"
            )
        job_id = f"{self._id_prefix}{uuid.uuid4()}"
        expires = datetime.now(UTC) + timedelta(seconds=deadline_s) if deadline_s else None
        future = self._collector.watch(job_id)
        give_up = time.monotonic() + self.settings.submit_timeout_s
        outgoing = Outgoing(job_id, job_input, expires, task, give_up, ref)
        ticket = Ticket(
            outgoing,
            samples=job_input.rows,
            nbytes=self._sender.wire_bytes(job_input),
            on_sent=functools.partial(self._sent, outgoing, future),
            waiting=waiting,
            holdable=holdable and task == PREDICT_TASK,
            answer=future if task == PREDICT_TASK else None,
        )
        if task == PREDICT_TASK:
            self._coalescer.submit(ticket)
        else:
            self._coalescer.send_alone(ticket)  # only predictions share a message
        return self._job(job_id, future, rows), ticket

    def _sent(self, job: Outgoing, future: Any, error: BaseException | None) -> None:
        """The job's message is published (or failed to be): track it, or free its slot."""
        if error is not None:
            # A caller waiting on the result (``predict``) gets the publish error.
            self._collector.fail(job.job_id, error)
            self._slots.release()
            return
        self._unfinished[job.job_id] = job
        self._recovery.track(job.job_id)
        future.add_done_callback(lambda _f: self._finished(job.job_id))

    def _job(self, job_id: str, future: Any, rows: slice | None = None) -> Job:
        return Job(
            job_id,
            future,
            default_timeout_s=self.settings.result_timeout_s,
            forget=self._collector.forget,
            rows=rows,
        )

    def _finished(self, job_id: str) -> None:
        self._unfinished.pop(job_id, None)
        self._recovery.forget(job_id)
        self._slots.release()

    def _results_exist(self, job_ids: list[str]) -> list[bool]:
        pipe = self._results.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.exists(RESULT_KEY_PREFIX + job_id)
        return [bool(n) for n in pipe.execute()]

    def _republish(self, job_id: str) -> None:
        job = self._unfinished.get(job_id)
        if job is not None:
            # Alone, under its own id, with a fresh PREDICTQ_SUBMIT_TIMEOUT_S of its own.
            self._sender.publish([dataclasses.replace(job, give_up=None)])

    def predict(
        self,
        inputs: object,
        *,
        timeout: float | None = None,
        deadline_s: float | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> Any:
        """Submit one job and wait for its result, its typed error, or its publish error.

        ``timeout`` (default ``PREDICTQ_RESULT_TIMEOUT_S``) counts from the call:
        it covers the job's wait to share a message and its publish too.
        On ``ResultTimeout`` the job is forgotten (its in-flight slot is freed at
        once; the caller has no handle to wait on it again), like ``apredict``.
        """
        check_timeout("timeout", timeout)  # before sending: a bad call sends nothing
        # One wait, on the result: the ticket is not ``waiting``, so this thread
        # is not woken when its message is published (another thread or the
        # coalescer's release thread publishes it, unless this one leads), only
        # when its result, or its publish error (``_sent``), arrives. Two
        # wake-ups per job cost the storm's producer ~15 thread switches per
        # message, under one GIL.
        job, ticket = self._enqueue(
            wire.normalize(inputs),
            deadline_s=deadline_s,
            rows=None,
            task=PREDICT_TASK,
            waiting=False,
            ref=model_ref(model, version),
            holdable=True,
        )
        try:
            return job.get(timeout)
        except ResultTimeout:
            self._coalescer.withdraw(ticket)  # still held: never sent
            job.forget()
            raise

    def job(self, job_id: str) -> Job:
        """A handle on a job submitted elsewhere (another process, an earlier run)."""
        return self._job(job_id, self._collector.watch(job_id))

    # --- queue -----------------------------------------------------------------

    def queue_length(self) -> int:
        """Jobs waiting in the queue (not yet reserved by a worker)."""
        return self._queue.length()

    # --- bulk ------------------------------------------------------------------

    def submit_many(
        self,
        inputs: object,
        *,
        chunk_size: int = 4096,
        deadline_s: float | None = None,
        window: int = 8,
        model: str | None = None,
        version: int | None = None,
    ) -> Iterator[Job]:
        """Split ``inputs`` into chunk jobs; yields a ``Job`` per chunk (``job.rows``), in order.

        Chunks are submitted ``window`` ahead of the one yielded, so workers stay
        busy while the caller reads results as it goes; a caller that only
        collects the handles submits everything (up to ``max_in_flight``).
        """
        return bulk.submit_chunks(
            functools.partial(self._submit, deadline_s=deadline_s, ref=model_ref(model, version)),
            wire.normalize(inputs),
            chunk_size=chunk_size,
            window=window,
        )

    def predict_many(
        self,
        inputs: object,
        *,
        chunk_size: int = 4096,
        progress: bool = False,
        timeout: float | None = None,
        max_in_flight: int | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> Any:
        """Predict a large input in chunk jobs; outputs come back in the input's order.

        At most ``max_in_flight`` (default: the client's) chunks are unfinished at
        any time, so memory stays at input + output + in-flight chunks.
        ``progress`` shows a tqdm bar on stderr.
        """
        check_timeout("timeout", timeout)
        cap = self.settings.max_in_flight
        return bulk.predict_chunks(
            functools.partial(self._submit, deadline_s=None, ref=model_ref(model, version)),
            wire.normalize(inputs),
            chunk_size=chunk_size,
            window=max(1, min(max_in_flight or cap, cap)),
            progress=progress,
            timeout_s=timeout or self.settings.result_timeout_s,
        )

    # --- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Stop collecting results and close connections."""
        if self._closed:
            return
        self._closed = True
        self._submit_pool.close()  # before the connections that running submits use
        self._coalescer.close()  # held jobs fail: "the client is closed"
        self._serving.close()
        self._recovery.close()
        self._collector.close()
        self._app.close()
        self._broker.close()
        self._results.close()

    def __enter__(self) -> PredictionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

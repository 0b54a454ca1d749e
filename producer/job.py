"""A submitted job: its result (an array, or the job's typed error) arrives later."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
from celery.exceptions import TaskRevokedError, WorkerLostError

from predictq.errors import (
    DeadlineExceeded,
    InvalidInput,
    PredictionError,
    PredictqError,
    ResultTimeout,
    WorkerLost,
)
from predictq.modelref import MODEL_VERSION_FIELD
from predictq.structure import flatten, unflatten
from producer.aio import wait_done

#: Longest accepted deadline or timeout: anything larger is a unit mistake.
MAX_TIMEOUT_S = 7 * 24 * 3600.0


def check_timeout(name: str, value: float | None) -> float | None:
    """Refuse negative, zero, NaN or absurd (> 1 week) timeouts with a typed error."""
    if value is None:
        return None
    if not isinstance(value, int | float) or not (0 < value <= MAX_TIMEOUT_S):
        raise InvalidInput(
            f"{name}: expected seconds in (0, {MAX_TIMEOUT_S:.0f}], received {value!r}"
        )
    return float(value)


class Job:
    """A submitted prediction: wait for it with ``get``, or ``await`` it in asyncio code."""

    def __init__(
        self,
        job_id: str,
        future: Future[dict[str, Any]],
        *,
        default_timeout_s: float,
        forget: Callable[[str], None],
        rows: slice | None = None,
    ) -> None:
        self.id = job_id
        #: For jobs from ``submit_many``: the rows of the input this job covers.
        self.rows = rows
        self._future = future
        self._default_timeout_s = default_timeout_s
        self._forget = forget

    def done(self) -> bool:
        """Whether the result (or error) has arrived."""
        return self._future.done()

    @property
    def model_version(self) -> int | None:
        """The version of the model that computed the result, once it arrived (else None).

        None too for a failed job, and for results of workers older than model versions.
        """
        if not self._future.done() or self._future.cancelled():
            return None
        version = self._future.result().get(MODEL_VERSION_FIELD)
        return version if isinstance(version, int) and not isinstance(version, bool) else None

    def get(self, timeout: float | None = None) -> Any:
        """The prediction (np.ndarray, or list/dict of arrays), or the job's typed error.

        Raises ``ResultTimeout`` if nothing arrived within ``timeout`` seconds
        (default ``PREDICTQ_RESULT_TIMEOUT_S``); the job may still finish later.
        """
        return _writable(self.raw_result(timeout))

    def raw_result(self, timeout: float | None = None) -> Any:
        """Like ``get``, but the arrays are read-only views of the received message."""
        return self._outcome_within(check_timeout("timeout", timeout) or self._default_timeout_s)

    async def aget(self, timeout: float | None = None) -> Any:
        """``get`` for asyncio code: ``await job.aget(timeout)``, or ``await job``.

        The loop never blocks and no thread waits: the collector thread wakes
        this task when the result arrives. Raises the job's typed error, or
        ``ResultTimeout`` after ``timeout`` seconds (default
        ``PREDICTQ_RESULT_TIMEOUT_S``); after a timeout the job is still
        watched, as after ``get``: await it again, or ``forget`` it.

        Cancelling the awaiting task (a web client that went away,
        ``asyncio.wait_for``) forgets the job: its in-flight slot is freed and
        its result no longer watched, but the job itself may still run on a
        worker.
        """
        wait_s = check_timeout("timeout", timeout) or self._default_timeout_s
        try:
            arrived = await wait_done(self._future, wait_s)
        except asyncio.CancelledError:
            self.forget()
            raise
        if not arrived:
            raise ResultTimeout(f"job {self.id}: no result within {wait_s:g}s")
        return _writable(self._outcome_within(wait_s))  # done: returns at once

    def __await__(self) -> Generator[Any, None, Any]:
        """``await job``: ``await job.aget()`` with the default timeout."""
        return self.aget().__await__()

    def _outcome_within(self, wait_s: float) -> Any:
        try:
            meta = self._future.result(wait_s)
        except FutureTimeout as e:
            raise ResultTimeout(f"job {self.id}: no result within {wait_s:g}s") from e
        except CancelledError as e:
            raise ResultTimeout(
                f"job {self.id}: stopped waiting (forgotten or client closed)"
            ) from e
        return _outcome(self.id, meta)

    def forget(self) -> None:
        """Stop waiting for this job and free its in-flight slot."""
        self._forget(self.id)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<Job {self.id} {state}>"


def wait_any(jobs: Iterable[Job], timeout: float) -> list[Job]:
    """The finished ones among ``jobs`` (in their order), waiting up to ``timeout`` s for one.

    Returns an empty list if none finished in time.
    """
    by_future = {job._future: job for job in jobs}
    done, _ = wait(by_future, timeout=timeout, return_when=FIRST_COMPLETED)
    return [job for future, job in by_future.items() if future in done]


def _writable(result: object) -> object:
    """Decoded results share the message buffer (read-only): give callers their own copy."""
    layout, leaves = flatten(result)
    return unflatten(layout, [np.array(v) if isinstance(v, np.ndarray) else v for v in leaves])


def _outcome(job_id: str, meta: dict[str, Any]) -> Any:
    status, result = meta.get("status"), meta.get("result")
    if status == "SUCCESS":
        return result
    if isinstance(result, PredictqError):
        raise result
    if isinstance(result, TaskRevokedError):
        if "expired" in str(result):
            raise DeadlineExceeded(
                f"job {job_id}: its deadline passed while it was queued"
            ) from result
        raise PredictionError(f"job {job_id} was revoked: {result}") from result
    if isinstance(result, WorkerLostError):
        raise WorkerLost(f"job {job_id}: {result}") from result
    if isinstance(result, BaseException):
        raise PredictionError(f"job {job_id} failed: {type(result).__name__}: {result}") from result
    raise PredictionError(f"job {job_id} ended in state {status}: {result!r}")

"""Coalescing: jobs submitted while a publish is in flight go together in the next message.

A leader/follower policy with no fixed wait. A job submitted while nothing is
being published is published at once, by its own thread (the *leader*): an
idle client adds no latency. Jobs submitted while a publish is in flight queue
up; when it ends, the leader takes the queued jobs (FIFO, up to ``max_jobs``,
``max_samples`` and ``max_bytes``) as the next message and hands it to one of
their threads, which becomes the next leader. So a busy client sends one
message per round trip to Redis, carrying every job that arrived during the
previous one.

Tickets of asyncio submits (``waiting=False``) have no thread waiting on them:
when a batch holds only such tickets, the leader publishes it as well, and goes
on until the queue is empty or a batch with a waiting thread can take over.

Invariant, guarded by ``_lock``: ``_busy`` is True exactly while one thread is
leader (between taking a batch and handing over or finding the queue empty),
and every queued ticket is then eventually taken by that thread or a successor.
Every ticket ends resolved (``sent`` done, ``on_sent`` called once), whatever
the publish raises: ``_send_batch`` catches everything around the one call, so
a follower never waits forever.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

from predictq.errors import PredictqError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Ticket(Generic[T]):
    """One job waiting to be published, and how to report that it was (or was not)."""

    def __init__(
        self,
        item: T,
        *,
        samples: int,
        nbytes: int,
        on_sent: Callable[[BaseException | None], None],
        waiting: bool,
    ) -> None:
        self.item = item
        self.samples = samples
        self.nbytes = nbytes
        #: Done once the job's message is in Redis; its exception if the publish failed.
        self.sent: Future[None] = Future()
        self.waiting = waiting
        self._on_sent = on_sent
        self._wake = threading.Event()
        self._lead: list[Ticket[T]] | None = None

    def _resolve(self, error: BaseException | None) -> None:
        try:
            self._on_sent(error)
        except Exception:
            # Bookkeeping of the client; the job's caller still gets its outcome.
            log.exception("after publishing job %r", self.item)
        if error is None:
            self.sent.set_result(None)
        else:
            self.sent.set_exception(error)
        self._wake.set()


class Coalescer(Generic[T]):
    """Publishes tickets through ``send`` (a list of one or more items per message)."""

    def __init__(
        self,
        send: Callable[[list[T]], None],
        *,
        max_jobs: int,
        max_samples: int,
        max_bytes: int,
    ) -> None:
        for name, value in (("max_jobs", max_jobs), ("max_samples", max_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        self._send = send
        self._max_jobs = max_jobs
        self._max_samples = max_samples
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._busy = False
        self._queue: deque[Ticket[T]] = deque()
        #: Messages published, and jobs in them (for tests and the benchmark).
        self.messages = 0
        self.jobs = 0

    def submit(self, ticket: Ticket[T]) -> None:
        """Publish ``ticket``'s job, alone now or with others soon.

        A waiting ticket returns once its message is published (``ticket.sent``
        is done; it holds the publish error, if any). A non-waiting one returns
        at once unless its thread has to publish.
        """
        with self._lock:
            if self._busy:
                self._queue.append(ticket)
                batch = None
            else:
                self._busy = True
                batch = [ticket]
        if batch is None:
            if not ticket.waiting:
                return
            ticket._wake.wait()
            batch = ticket._lead
            if batch is None:
                return  # published by another thread
        self._lead(batch)

    def send_alone(self, ticket: Ticket[T]) -> None:
        """Publish ``ticket``'s job in a message of its own, now, on this thread."""
        self._send_batch([ticket])

    def _lead(self, batch: list[Ticket[T]]) -> None:
        while True:
            self._send_batch(batch)
            with self._lock:
                batch = self._take()
                if not batch:
                    self._busy = False
                    return
            successor = next((t for t in batch if t.waiting), None)
            if successor is not None:
                successor._lead = batch
                successor._wake.set()
                return
            # Only asyncio tickets, with no thread of their own: publish them here.

    def _take(self) -> list[Ticket[T]]:
        """The next batch from the queue, FIFO, within the bounds (caller holds _lock)."""
        batch: list[Ticket[T]] = []
        samples = nbytes = 0
        while self._queue and len(batch) < self._max_jobs:
            ticket = self._queue[0]
            fits = samples + ticket.samples <= self._max_samples
            fits = fits and nbytes + ticket.nbytes <= self._max_bytes
            if batch and not fits:
                break
            batch.append(self._queue.popleft())
            samples += ticket.samples
            nbytes += ticket.nbytes
        return batch

    def _send_batch(self, batch: list[Ticket[T]]) -> None:
        error: BaseException | None = None
        try:
            self._send([t.item for t in batch])
        except BaseException as e:  # every ticket gets it, then it is re-raised by its caller
            error = e
        else:
            with self._lock:
                self.messages += 1
                self.jobs += len(batch)
        for i, ticket in enumerate(batch):
            ticket._resolve(error if i == 0 or error is None else _own_copy(error))


def _own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` for another caller, so that threads do not share one traceback."""
    if isinstance(error, PredictqError):  # each takes exactly its message (predictq/errors.py)
        copy = type(error)(str(error))
        copy.__cause__ = error.__cause__
        return copy
    return error

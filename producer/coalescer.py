"""Coalescing: jobs submitted while a publish is in flight go together in the next message.

A leader/follower policy with no fixed wait. A job submitted while nothing is
being published is published at once, by its own thread (the *leader*): an
idle client adds no latency. Jobs submitted while a publish is in flight queue
up; when it ends, the leader takes the queued jobs (FIFO, up to ``max_jobs``,
``max_samples`` and ``max_bytes``) as the next message and hands it to one of
their threads, which becomes the next leader. So a busy client sends one
message per round trip to Redis, carrying every job that arrived during the
previous one.

Tickets of asyncio submits and of ``predict`` (``waiting=False``: their callers
wait for the result, not for the publish) have no thread waiting on them: a
batch of only such tickets is published by the release thread, which leads on
until the queue is empty or a batch with a waiting thread can take over. A
caller's thread publishes its own message, never the ones after it.

Holding. A publish takes a fraction of a millisecond, so callers that each
wait for their result before submitting again (``predict`` in a closed loop)
rarely overlap one, and every job would travel alone. A *holdable* ticket (its
caller waits for the result anyway: ``predict``, ``apredict``) that finds
``max_unanswered()`` of this client's messages without a single answer yet
queues instead of being published; the queue goes out as one message when one
of those messages gets its first answer (a done-callback on the job's result
future, run by the collector thread), or when its oldest ticket has waited
``max_hold_s`` (no worker, or a slow one). The release thread of this object
does both, waiting on ``_cond``: no polling.

Refilling. With the cap alone, a worker finishing a message waits idle for the
next one: the answer travels back, the held jobs go out, the worker decodes
them (measured: the conv net's device busy 52% of a storm). So once the queue
holds as many jobs as the message answered last carried (the callers it
answered, submitting again), and that is at least ``REFILL_MIN_JOBS``, the
queue goes out at once as one more message, one beyond the cap at most: it
waits in the worker's queue while the previous one computes, and messages stay
as large as before (the conv net's storm: 713 -> 941 jobs/s, device busy 89%).
Until a message of ``REFILL_MIN_JOBS`` is answered, the newest unanswered
message's size stands in. Small messages never refill: holding is what makes
them grow. (Sized by the newest message instead, two alternating messages of
18 and 14 jobs left 4 jobs behind at each refill, held until the next answer:
measured, a job held 5.3 ms on average before its publish, 2.4 ms sized by
the answered one.)

Invariants, guarded by ``_lock`` (``_cond`` is a condition on it):

* ``_busy`` is True exactly while one thread is leader (between taking a batch
  and handing it over or finding nothing ready): never two leaders;
* a queued ticket is taken by the leader or a successor as soon as it is
  ready (a non-holdable ticket always is), and otherwise, while no one leads,
  by the release thread at the latest ``max_hold_s`` after it queued: every
  held ticket is eventually published, or failed (``withdraw``, ``close``);
* ``_unanswered`` is the number of messages in ``_open``: published, with
  answer futures, none seen done yet; each leaves once (``_mark_answered``),
  on its first answer's callback or earlier, when a submit finds it done;
* holdable tickets make ``_unanswered`` exceed ``max_unanswered()`` by one
  at most (``_refill``).

Every ticket ends resolved (``sent`` done, ``on_sent`` called once), whatever
the publish raises: ``_send_batch`` catches everything around the one call, so
a follower never waits forever.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from typing import Any, Generic, TypeVar

from predictq.errors import PredictqError
from producer.tickets import Message, Ticket, own_copy

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Smallest unanswered message that a full queue of held jobs may follow at once.
REFILL_MIN_JOBS = 4


class Coalescer(Generic[T]):
    """Publishes tickets through ``send`` (a list of one or more items per message)."""

    def __init__(
        self,
        send: Callable[[list[T]], None],
        *,
        max_jobs: int,
        max_samples: int,
        max_bytes: int,
        max_unanswered: Callable[[], int] = lambda: 1,
        max_hold_s: float = 0.0,
    ) -> None:
        for name, value in (("max_jobs", max_jobs), ("max_samples", max_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if not 0 <= max_hold_s <= 10:
            raise ValueError(f"max_hold_s must be seconds between 0 and 10, got {max_hold_s!r}")
        self._send = send
        self._max_jobs = max_jobs
        self._max_samples = max_samples
        self._max_bytes = max_bytes
        self._max_unanswered = max_unanswered
        # Holding only pays when messages carry several jobs.
        self._hold_s = max_hold_s if max_jobs > 1 else 0.0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._busy = False
        self._queue: deque[Ticket[T]] = deque()
        self._eager = 0  # non-holdable tickets in _queue
        self._unanswered = 0
        self._open: dict[Message, None] = {}  # the unanswered messages, oldest first
        self._answered_size = 0  # jobs in the message answered last
        self._closed = False
        self._releaser: threading.Thread | None = None
        # A batch taken by _answered for the release thread to lead (_busy is set).
        self._orphan: list[Ticket[T]] | None = None
        #: Messages published, jobs in them, and jobs held when submitted (tests, benchmark).
        self.messages = 0
        self.jobs = 0
        self.held = 0

    def submit(self, ticket: Ticket[T]) -> None:
        """Publish ``ticket``'s job, alone now or with others soon.

        A waiting ticket returns once its message is published (``ticket.sent``
        is done; it holds the publish error, if any). A non-waiting one returns
        at once unless its thread has to publish.
        """
        batch: list[Ticket[T]] | None = None
        with self._cond:
            if self._closed:
                closed = True
            else:
                closed = False
                ticket.queued_at = time.monotonic()
                self._queue.append(ticket)
                if not ticket.holdable or not self._hold_s:
                    self._eager += 1
                if self._busy:
                    pass  # the leader takes it
                elif ticket.holdable and self._hold_s and self._over_cap() and not self._refill():
                    self.held += 1
                    self._start_releaser()
                    self._cond.notify()  # the release thread times its hold
                else:
                    self._busy = True
                    batch = self._take()
        if closed:
            ticket._resolve(PredictqError("the client is closed"))
            return
        if batch is None:
            if not ticket.waiting:
                return
            assert ticket._wake is not None  # a waiting ticket has one
            ticket._wake.wait()
            batch = ticket._lead
            if batch is None:
                return  # published by another thread
        self._lead(batch)

    def send_alone(self, ticket: Ticket[T]) -> None:
        """Publish ``ticket``'s job in a message of its own, now, on this thread."""
        self._send_batch([ticket])

    def withdraw(self, ticket: Ticket[T]) -> bool:
        """Take a still queued ticket back (its caller went away): it is never published.

        True if it was queued; it is then resolved with ``CancelledError``.
        False if it is already published or being published.
        """
        with self._cond:
            try:
                self._queue.remove(ticket)
            except ValueError:
                return False
            if not ticket.holdable or not self._hold_s:
                self._eager -= 1
        ticket._resolve(CancelledError())
        return True

    def close(self) -> None:
        """Fail the queued tickets ("the client is closed") and stop the release thread."""
        with self._cond:
            self._closed = True
            queued, self._queue = list(self._queue), deque()
            self._eager = 0
            self._cond.notify_all()
            releaser = self._releaser
        if releaser is not None and releaser is not threading.current_thread():
            releaser.join(5)
        for ticket in queued:
            ticket._resolve(PredictqError("the client is closed"))

    # --- leading ---------------------------------------------------------------

    def _lead(self, batch: list[Ticket[T]]) -> None:
        while True:
            self._send_batch(batch)
            with self._cond:
                batch = self._take() if self._ready(time.monotonic()) else []
                if not batch:
                    self._busy = False
                    if self._queue:  # held tickets: the release thread times their hold
                        self._start_releaser()
                        self._cond.notify()
                    return
                if threading.current_thread() is not self._releaser and not any(
                    t.waiting for t in batch
                ):
                    # No thread of their own (asyncio, predict): the release thread
                    # leads on. A caller's thread stays for no one else's message:
                    # under a steady stream it would publish for ever, its own
                    # result long in.
                    self._orphan = batch
                    self._start_releaser()
                    self._cond.notify()
                    return
            if self._hand_over(batch):
                return
            # The release thread, with a batch that no thread waits on: publish it here.

    def _hand_over(self, batch: list[Ticket[T]]) -> bool:
        """Make a waiting thread of ``batch`` its leader; False if it has none."""
        successor = next((t for t in batch if t.waiting), None)
        if successor is None:
            return False
        successor._lead = batch
        assert successor._wake is not None  # a waiting ticket has one
        successor._wake.set()
        return True

    def _cap(self) -> int:
        """Unanswered messages past which holdable tickets wait (caller holds _lock)."""
        try:
            return max(1, self._max_unanswered())
        except Exception:  # a broken policy must not stop publishing
            log.exception("max_unanswered failed; using 1")
            return 1

    def _over_cap(self) -> bool:
        """Whether ``max_unanswered()`` messages are unanswered (caller holds _lock)."""
        cap = self._cap()
        if self._unanswered < cap:
            return False
        # A future wakes the thread waiting on it before it runs its callbacks:
        # a predict caller may submit again before _answered saw its result.
        # Only a message's first and last answers are looked at: a worker
        # stores a message's outcomes in entry order (its refused entries
        # first), so these are among the first done, and any other is caught
        # by _answered, its callback, a moment later. Looking at all of them
        # made every submit of a storm poll each future of the message in
        # flight: ~15 lock round trips per job, under the producer's GIL.
        for message in list(self._open):
            answers = message.answers
            if answers[0].done() or answers[-1].done():
                self._mark_answered(message)
                if self._unanswered < cap:
                    return False
        return True

    def _refill(self) -> bool:
        """Whether the held queue is to follow the newest unanswered message now, one past
        the cap (module docstring, "Refilling"; caller holds _lock, after ``_over_cap``)."""
        if not self._open or self._unanswered > self._cap():
            return False
        # Sized by the answered message, whose callers are the ones submitting
        # again (module docstring, "Refilling": why not the newest's size).
        size = self._answered_size
        if size < REFILL_MIN_JOBS:  # none answered yet, or a small one: growing
            size = next(reversed(self._open)).size
        return size >= REFILL_MIN_JOBS and len(self._queue) >= size

    def _mark_answered(self, message: Message) -> bool:
        """Count ``message`` as answered, once; False if it already was (caller holds _lock)."""
        if message.answered:
            return False
        message.answered = True
        self._answered_size = message.size
        self._unanswered -= 1
        del self._open[message]
        return True

    def _ready(self, now: float) -> bool:
        """Whether the queue is to be published now (caller holds _lock)."""
        if not self._queue:
            return False
        if self._eager or not self._over_cap() or self._refill():
            return True
        return now - self._queue[0].queued_at >= self._hold_s

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
            if not ticket.holdable or not self._hold_s:
                self._eager -= 1
            samples += ticket.samples
            nbytes += ticket.nbytes
        return batch

    # --- releasing held tickets ------------------------------------------------

    def _start_releaser(self) -> None:
        """Start the release thread, once (caller holds _lock)."""
        if self._releaser is None:
            self._releaser = threading.Thread(
                target=self._release_loop, name="predictq-coalesce", daemon=True
            )
            self._releaser.start()

    def _release_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._orphan is not None:
                        batch, self._orphan = self._orphan, None
                        break
                    if self._closed:
                        return
                    now = time.monotonic()
                    if not self._busy and self._ready(now):
                        self._busy = True
                        batch = self._take()
                        break
                    # Only a hold limit needs a timeout; answers and leaders notify.
                    wait_s = None
                    if not self._busy and self._queue:
                        wait_s = self._queue[0].queued_at + self._hold_s - now
                    self._cond.wait(wait_s)
            if not self._hand_over(batch):
                try:
                    self._lead(batch)
                except Exception:  # _send_batch resolves every ticket; this is a bug
                    log.exception("releasing held jobs failed")

    def _answered(self, message: Message, _future: Future[Any]) -> None:
        """A result of ``message`` arrived (or its caller forgot it): it is answered.

        Runs on the collector thread (or a thread that forgets a job). Held jobs
        go now: their batch is handed straight to one of their waiting threads
        (a thread switch less than through the release thread, which counts
        under a busy GIL); a batch of asyncio jobs only, to the release thread,
        so that this thread never publishes.
        """
        with self._cond:
            if not self._mark_answered(message):
                return
            if self._busy or not self._ready(time.monotonic()):
                return
            self._busy = True
            batch = self._take()
            if not any(t.waiting for t in batch):
                self._orphan = batch
                self._start_releaser()
                self._cond.notify()
                return
        self._hand_over(batch)

    def _send_batch(self, batch: list[Ticket[T]]) -> None:
        error: BaseException | None = None
        try:
            self._send([t.item for t in batch])
        except BaseException as e:  # every ticket gets it, then it is re-raised by its caller
            error = e
        else:
            answers = [t.answer for t in batch if t.answer is not None]
            message = Message(answers, len(batch))
            with self._lock:
                self.messages += 1
                self.jobs += len(batch)
                if answers:
                    self._unanswered += 1
                    self._open[message] = None
            if answers:
                # Outside the lock: a future already done runs the callback here.
                on_answer = functools.partial(self._answered, message)
                for answer in answers:
                    answer.add_done_callback(on_answer)
        for i, ticket in enumerate(batch):
            ticket._resolve(error if i == 0 or error is None else own_copy(error))

"""asyncio support: wait for results without a thread, submit without blocking the loop.

Results still come from the client's one collector thread (producer/collector.py),
which resolves a ``concurrent.futures.Future`` per job. ``wait_done`` bridges such
a future to the running event loop: a done-callback, run by whichever thread
resolves the future, wakes an asyncio future with ``loop.call_soon_threadsafe``.
No thread waits per job, and the loop never blocks.

A submit does Redis I/O (LPUSH, sometimes LLEN, retries while Redis is down) and
may wait for an in-flight slot, so ``SubmitPool`` runs submits on a few threads of
the client's own, off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from predictq.errors import PredictqError

T = TypeVar("T")

#: Threads per client that run ``asubmit``'s submits. Bounded, so that a burst of
#: requests queues in the executor (a cheap list) instead of starting a thread and
#: a Redis connection each. Four is enough: a submit is a few hundred microseconds
#: of checking and encoding under the GIL plus one Redis round trip, so four
#: threads keep up with far more submits per second than one event loop asks for,
#: and more threads would only contend for the GIL with the loop itself. Submits
#: beyond ``max_in_flight`` wait for a slot in these threads (up to
#: ``PREDICTQ_SUBMIT_TIMEOUT_S``), the queued ones behind them: that is the
#: backpressure the synchronous ``submit`` gives too.
SUBMIT_THREADS = 4


async def wait_done(future: Future[Any], timeout_s: float | None) -> bool:
    """Wait, on the running loop, until ``future`` is done: True, or False after ``timeout_s``.

    Neither a timeout nor cancelling the waiting task touches ``future``: what to
    do with it then is the caller's decision.
    """
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: Future[Any]) -> None:
        # Runs on the thread that resolves `future` (the collector), or on the
        # loop's own thread when a job is forgotten there.
        with contextlib.suppress(RuntimeError):  # "Event loop is closed": nobody waits
            loop.call_soon_threadsafe(_set_done, woken)

    # The callback stays on `future` until it is done (a concurrent future cannot
    # drop one); it holds only `loop` and `woken`, and does nothing once `woken` is.
    future.add_done_callback(wake)
    try:
        async with asyncio.timeout(timeout_s):
            await woken
    except TimeoutError:
        return False
    return True


def _set_done(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class SubmitPool:
    """Runs blocking submits on ``SUBMIT_THREADS`` threads, awaited from the loop."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(SUBMIT_THREADS, thread_name_prefix="predictq-submit")

    async def run(self, submit: Callable[[], T], *, abandoned: Callable[[T], None]) -> T:
        """``submit()`` on a pool thread; its result, or its exception.

        If the awaiting task is cancelled, a submit still queued never runs, and
        what a running one returns is handed to ``abandoned`` (a submit cannot be
        stopped half-way: the job may be in Redis already).
        """
        try:
            future = self._pool.submit(submit)
        except RuntimeError as e:  # "cannot schedule new futures after shutdown"
            raise PredictqError("the client is closed") from e
        try:
            await wait_done(future, None)
        except asyncio.CancelledError:
            if not future.cancel():
                future.add_done_callback(functools.partial(_abandon, abandoned))
            raise
        try:
            return future.result()
        except FutureCancelled as e:  # cancelled by close() while queued
            raise PredictqError("the client is closed") from e

    def close(self) -> None:
        """Drop queued submits (their callers get "the client is closed"); wait for running ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def _abandon(abandoned: Callable[[T], None], future: Future[T]) -> None:
    if not future.cancelled() and future.exception() is None:
        abandoned(future.result())

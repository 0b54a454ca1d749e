"""The asyncio calls of ``PredictionClient``: ``asubmit``, ``apredict``, ``aclose``.

A mixin that ``PredictionClient`` (producer/client.py) inherits, kept apart so
that the client stays one concern: the synchronous submit path. These calls
reuse that path (``_enqueue``) on the client's submit threads
(producer/aio.py ``SubmitPool``) and wait with ``wait_done``: no thread per
waiting job, no Redis call on the event loop, and a cancelled awaiting task
takes its held job back or forgets its sent one.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

from predictq.celeryconf import PREDICT_TASK
from predictq.errors import PredictqError, ResultTimeout
from predictq.modelref import ModelRef
from predictq.settings import Settings
from producer import wire
from producer.aio import SubmitPool, wait_done
from producer.coalescer import Coalescer
from producer.job import Job, check_timeout
from producer.sender import Outgoing
from producer.tickets import Ticket
from producer.wire import model_ref


class AsyncCalls:
    """The asyncio calls of ``PredictionClient`` (producer/client.py), which inherits them.

    They reuse the client's synchronous submit path (``_enqueue``) on the
    client's submit threads (``SubmitPool``) and wait for results with
    ``wait_done``: no thread per waiting job, no Redis call on the loop.
    """

    # Provided by PredictionClient (declared, not copied: its signatures live there).
    settings: Settings
    _closed: bool
    _submit_pool: SubmitPool
    _coalescer: Coalescer[Outgoing]
    _enqueue: Callable[..., tuple[Job, Ticket[Outgoing]]]
    close: Callable[[], None]

    async def asubmit(
        self,
        inputs: object,
        *,
        deadline_s: float | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> Job:
        """``submit`` for asyncio code: ``job = await client.asubmit(x)``, then ``await job``.

        The submit (input checks, Redis I/O, waiting for an in-flight slot) runs
        on the client's submit threads, never on the event loop. If the awaiting
        task is cancelled meanwhile, a job not yet sent never is, and one already
        sent is forgotten at once.
        """
        return await self._asubmit(inputs, deadline_s, model_ref(model, version), holdable=False)

    async def _asubmit(
        self, inputs: object, deadline_s: float | None, ref: ModelRef, *, holdable: bool
    ) -> Job:
        if self._closed:
            raise PredictqError("the client is closed")
        # On a submit thread: checks, an in-flight slot, then the coalescer, which
        # returns at once (the job goes out with the next message) unless this
        # thread has to publish.
        enqueue = functools.partial(self._enqueue_async, inputs, deadline_s, ref, holdable)
        job, ticket = await self._submit_pool.run(enqueue, abandoned=_forget_enqueued)
        try:
            await wait_done(ticket.sent, None)
        except asyncio.CancelledError:
            self._coalescer.withdraw(ticket)  # still queued (held): never sent
            job.forget()
            raise
        ticket.sent.result()  # the publish error, if any (its slot is free again)
        return job

    def _enqueue_async(
        self, inputs: object, deadline_s: float | None, ref: ModelRef, holdable: bool
    ) -> tuple[Job, Ticket[Outgoing]]:
        return self._enqueue(
            wire.normalize(inputs),
            deadline_s=deadline_s,
            rows=None,
            task=PREDICT_TASK,
            waiting=False,
            ref=ref,
            holdable=holdable,
        )

    async def apredict(
        self,
        inputs: object,
        *,
        timeout: float | None = None,
        deadline_s: float | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> Any:
        """``predict`` for asyncio code: ``await client.apredict(x, timeout=30)``.

        Raises the same typed errors as ``predict``. On ``ResultTimeout``, or when
        the awaiting task is cancelled, the job is forgotten: its in-flight slot
        is freed at once, though the job itself may still run on a worker.
        """
        check_timeout("timeout", timeout)  # before sending: a bad call sends nothing
        job = await self._asubmit(inputs, deadline_s, model_ref(model, version), holdable=True)
        try:
            return await job.aget(timeout)
        except ResultTimeout:
            job.forget()  # nobody else holds the job
            raise

    async def aclose(self) -> None:
        """``close`` for asyncio code, off the loop (it joins the client's threads)."""
        await asyncio.to_thread(self.close)


def _forget_enqueued(enqueued: tuple[Job, Ticket[Outgoing]]) -> None:
    enqueued[0].forget()

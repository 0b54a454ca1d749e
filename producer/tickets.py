"""What the coalescer (producer/coalescer.py) moves: tickets of jobs, and published messages.

A ``Ticket`` is one job on its way into a message: its caller waits on
``sent`` (or not, for asyncio), and ``_resolve`` reports the publish once. The
coalescer, the one user of the underscored members, hands a waiting ticket the
batch it is to publish (``_lead``, ``_wake``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

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
        holdable: bool = False,
        answer: Future[Any] | None = None,
    ) -> None:
        self.item = item
        self.samples = samples
        self.nbytes = nbytes
        #: Done once the job's message is in Redis; its exception if the publish failed.
        self.sent: Future[None] = Future()
        self.waiting = waiting
        #: Its caller waits for the result anyway: it may wait to share a message.
        self.holdable = holdable
        #: Done when the job's result (or error) arrives: its message is answered.
        self.answer = answer
        self.queued_at = 0.0
        self._on_sent = on_sent
        # Only a waiting ticket's thread is ever woken (to lead, or once published).
        self._wake = threading.Event() if waiting else None
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
        if self._wake is not None:
            self._wake.set()


class Message:
    """A published message awaiting its first answer."""

    __slots__ = ("answered", "answers", "size")

    def __init__(self, answers: list[Future[Any]], size: int) -> None:
        self.answered = False
        self.answers = answers
        self.size = size  # jobs carried


def own_copy(error: BaseException) -> BaseException:
    """A copy of ``error`` for another caller, so that threads do not share one traceback."""
    if isinstance(error, PredictqError):  # each takes exactly its message (predictq/errors.py)
        copy = type(error)(str(error))
        copy.__cause__ = error.__cause__
        return copy
    return error

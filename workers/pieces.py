"""What the batcher moves around: requests (one per job), their pieces, batch stats.

A request's pieces are contiguous slices of its samples, so that a job larger
than one device call is split and its outputs reassembled by sample offset.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class BatchStats:
    """What one device call did, for metrics."""

    samples: int
    requests: int
    device_s: float
    oldest_wait_s: float


class Request:
    """One submitted job: its future and the outputs of its pieces, by sample offset."""

    def __init__(
        self,
        n: int,
        deadline: float | None,
        before_run: Callable[[], None] | None,
        after_run: Callable[[], None] | None,
    ) -> None:
        self.future: Future[list[Array]] = Future()
        self.n = n
        self.deadline = deadline
        self.before_run = before_run
        self.after_run = after_run
        self.submitted_at = time.monotonic()
        self._parts: dict[int, list[Array]] = {}
        self._received = 0

    def deliver(self, offset: int, outputs: list[Array]) -> None:
        if self.future.done():
            return
        self._parts[offset] = outputs
        self._received += outputs[0].shape[0]
        if self._received == self.n:
            if self.after_run is not None:
                # On the device thread, before it starts the next batch.
                try:
                    self.after_run()
                except Exception as e:
                    self.fail(e)
                    return
            ordered = [self._parts[k] for k in sorted(self._parts)]
            if len(ordered) == 1:
                self.future.set_result(ordered[0])
            else:
                self.future.set_result(
                    [np.concatenate(cols) for cols in zip(*ordered, strict=True)]
                )

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class Piece:
    """A contiguous slice ``[offset, offset + n)`` of one request's samples."""

    request: Request
    offset: int
    inputs: list[Array]
    isolated: bool
    signature: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.signature = tuple(a.shape[1:] for a in self.inputs)

    @property
    def n(self) -> int:
        return int(self.inputs[0].shape[0])

    def halves(self) -> tuple[Piece, Piece]:
        k = self.n // 2
        return (
            Piece(self.request, self.offset, [a[:k] for a in self.inputs], self.isolated),
            Piece(self.request, self.offset + k, [a[k:] for a in self.inputs], self.isolated),
        )

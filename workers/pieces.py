"""What the batcher queues: a submitted job (``Request``) and its device-sized pieces.

A piece is a contiguous slice of one request's samples, tagged with the model
version (``run``) that must compute it; the batcher (workers/batcher.py) only
batches pieces of the same ``run`` and input signature together.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
#: One device call: a model version's compiled call on a batch.
RunFn = Callable[[list[Array]], list[Array]]


class Request:
    """One submitted job: its future and the outputs of its pieces, by sample offset."""

    def __init__(self, n: int, deadline: float | None) -> None:
        self.future: Future[list[Array]] = Future()
        self.n = n
        self.deadline = deadline
        self.submitted_at = time.monotonic()
        self._parts: dict[int, list[Array]] = {}
        self._received = 0

    def deliver(self, offset: int, outputs: list[Array]) -> None:
        if self.future.done():
            return
        self._parts[offset] = outputs
        self._received += outputs[0].shape[0]
        if self._received < self.n:
            return
        ordered = [self._parts[k] for k in sorted(self._parts)]
        if len(ordered) == 1:
            self.future.set_result(ordered[0])
        else:
            self.future.set_result([np.concatenate(cols) for cols in zip(*ordered, strict=True)])

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
    run: RunFn
    labels: tuple[str, str]
    signature: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.signature = tuple(a.shape[1:] for a in self.inputs)

    @property
    def n(self) -> int:
        return int(self.inputs[0].shape[0])

    def halves(self) -> tuple[Piece, Piece]:
        k = self.n // 2
        first = [a[:k] for a in self.inputs]
        rest = [a[k:] for a in self.inputs]
        return (
            Piece(self.request, self.offset, first, self.isolated, self.run, self.labels),
            Piece(self.request, self.offset + k, rest, self.isolated, self.run, self.labels),
        )


@dataclass(frozen=True)
class BatchStats:
    """What one device call did, for metrics."""

    samples: int
    requests: int
    device_s: float
    oldest_wait_s: float
    #: What the submitter labelled the batch's requests with (model name, version).
    labels: tuple[str, str] = ("", "")


def oom_halves(pieces: list[Piece]) -> tuple[list[Piece], ...] | None:
    """A batch's two halves to retry after running out of memory (a lone piece's rows
    split in two); None for a single sample, which cannot be split."""
    if len(pieces) > 1:
        mid = len(pieces) // 2
        return pieces[:mid], pieces[mid:]
    if pieces[0].n > 1:
        return tuple([h] for h in pieces[0].halves())
    return None


def joined_inputs(pieces: list[Piece]) -> list[Array]:
    """One array per model input holding every piece's samples, in order."""
    if len(pieces) == 1:
        return pieces[0].inputs
    return [np.concatenate(cols) for cols in zip(*(p.inputs for p in pieces), strict=True)]


def split_outputs(pieces: list[Piece], outputs: list[Array]) -> list[list[Array]]:
    """Each piece's rows of a batch's outputs (views, in ``pieces`` order)."""
    split: list[list[Array]] = []
    start = 0
    for piece in pieces:
        split.append([out[start : start + piece.n] for out in outputs])
        start += piece.n
    return split


def take_compatible(
    queue: deque[Piece], batch: list[Piece], samples: int, max_samples: int
) -> tuple[int, deque[Piece]]:
    """Move queued pieces that fit into ``batch`` (FIFO): same run and signature, not
    isolated, up to ``max_samples``. Returns the batch's samples and the queue left."""
    signature, run = batch[0].signature, batch[0].run
    kept: deque[Piece] = deque()
    while queue:
        piece = queue.popleft()
        if piece.isolated or piece.run is not run or piece.signature != signature:
            kept.append(piece)
        elif samples + piece.n <= max_samples:
            batch.append(piece)
            samples += piece.n
        else:
            # First in line for the next batch: keep FIFO order.
            kept.append(piece)
            kept.extend(queue)
            queue.clear()
    return samples, kept

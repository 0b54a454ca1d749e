"""Dynamic micro-batching: many concurrent jobs, one device call at a time.

Jobs running in the threads pool hand their input arrays to ``Batcher.submit``
and wait on the returned future. A single device thread takes the first waiting
piece, fills the batch with compatible pieces until ``max_batch_size`` samples
or ``batch_wait_ms`` after the first arrival, runs ONE call, and splits the
outputs back to each job.

Invariants (each has a test in tests/test_batcher.py):

* Only the device thread calls ``run``: device access is serialized per process.
* Every submitted request ends with its result or its own exception, never a
  hang: per-request errors are caught around each call, and if the device thread
  itself dies, every pending request is failed before the thread exits.
* A failing multi-request batch is retried request by request, so one bad job
  cannot fail its neighbours; an out-of-memory batch is split in halves, down to
  one sample, before a request fails with ``DeviceOutOfMemory``.
* Outputs are matched to requests by sample offsets, and every output's length
  is checked against the batch's sample count.
* A request larger than ``max_batch_size`` is split into device-sized pieces
  that are reassembled in order.

The wait for more jobs ends as soon as none is expected (none announced, and no
steady stream whose waits pay off: workers/arrivals.py), so an idle worker adds
no latency while a busy one fills its batches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager

import numpy as np

from predictq.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    ModelNotReady,
    PredictionError,
    PredictqError,
)
from workers.arrivals import ArrivalTracker
from workers.pieces import Array, BatchStats, Piece, Request

__all__ = ["BatchStats", "Batcher"]

log = logging.getLogger(__name__)

RunFn = Callable[[list[Array]], list[Array]]


class Batcher:
    """Runs ``run`` on batches of concurrently submitted requests, on one thread."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        batch_wait_ms: float,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_crash: Callable[[BaseException], None] | None = None,
        on_isolate: Callable[[int], None] | None = None,
        name: str = "predictq-device",
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be integer >= 1, got {max_batch_size!r}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
        self._run = run
        self._max = max_batch_size
        self._wait_s = batch_wait_ms / 1000.0
        self._on_batch = on_batch
        self._on_crash = on_crash
        self._on_isolate = on_isolate
        # _cond guards _queue, _incoming and _closed. Invariant: a piece enters
        # _queue only while not _closed, and leaves it only on the device
        # thread, so after close() + join() nothing can be left pending.
        self._cond = threading.Condition()
        self._queue: deque[Piece] = deque()
        self._incoming = 0
        self._closed = False
        self._arrivals = ArrivalTracker()  # guarded by _cond too
        # Written only by the device thread; read without a lock by a watchdog
        # (a float assignment is atomic under the GIL).
        self._call_started: float | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        """Start the device thread."""
        self._thread.start()

    def call_running_s(self, now: float) -> float:
        """How long the device call in progress has run (0 when none is)."""
        started = self._call_started
        return 0.0 if started is None else now - started

    @property
    def max_batch_size(self) -> int:
        """Samples per device call."""
        return self._max

    @contextmanager
    def announce(self) -> Iterator[None]:
        """Declare a job on its way to ``submit`` (held while it decodes and validates).

        While any job is announced, the device thread may wait up to
        ``batch_wait_ms`` for it; with none announced it runs what it has at once.
        """
        with self._cond:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cond:
                self._incoming -= 1
                self._cond.notify_all()

    def submit(
        self,
        inputs: Sequence[Array],
        *,
        deadline: float | None = None,
        isolated: bool = False,
        before_run: Callable[[], None] | None = None,
        after_run: Callable[[], None] | None = None,
    ) -> Future[list[Array]]:
        """Queue one request; the future holds its outputs (one array per model output).

        ``deadline`` is a ``time.monotonic()`` instant after which the request is
        dropped with ``DeadlineExceeded`` instead of run. ``isolated`` requests run
        in batches of their own. ``before_run`` is called on the device thread
        right before the request's first device call; if it raises, the request
        fails with that error and is not run. ``after_run`` is called on the
        device thread once all the request's device calls returned, before the
        next batch starts; if it raises, the request fails with that error.
        """
        arrays = list(inputs)
        n = int(arrays[0].shape[0])
        request = Request(n, deadline, before_run, after_run)
        pieces = [
            Piece(request, start, [a[start : start + self._max] for a in arrays], isolated)
            for start in range(0, n, self._max)
        ]
        with self._cond:
            if self._closed:
                raise ModelNotReady("the worker is shutting down and takes no new jobs")
            self._arrivals.arrived(request.submitted_at)
            self._queue.extend(pieces)
            self._cond.notify_all()
        return request.future

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests, finish the queued ones, join the device thread.

        Returns False if the thread did not finish within ``timeout_s``; then the
        requests still queued are failed so that no caller waits forever.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._fail_queued(ModelNotReady("the worker shut down before this job ran"))
            return False
        return True

    # --- device thread ---------------------------------------------------------

    def _loop(self) -> None:
        batch: list[Piece] = []
        try:
            while True:
                batch = self._next_batch()
                if not batch:
                    return
                self._run_batch(batch)
                batch = []
        except BaseException as e:
            # Invariant "never a hang": whatever killed the loop, fail every
            # request it was responsible for, and refuse new ones. Not re-raised:
            # there is nobody above this thread to handle it.
            log.exception("device thread crashed; failing all pending jobs")
            error = PredictionError(f"the device thread crashed: {e!r}")
            for piece in batch:
                piece.request.fail(error)
            with self._cond:
                self._closed = True
            self._fail_queued(error)
            if self._on_crash is not None:
                self._on_crash(e)

    def _fail_queued(self, error: BaseException) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
        for piece in pending:
            piece.request.fail(error)

    def _next_batch(self) -> list[Piece]:
        """Block for the first piece, then fill; empty only when closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return []
                self._cond.wait()
            first = self._queue.popleft()
            batch, samples = [first], first.n
            if first.isolated:
                return batch
            self._arrivals.new_batch()
            wait_until = time.monotonic() + self._wait_s
            while samples < self._max:
                samples = self._take_compatible(batch, samples)
                now = time.monotonic()
                wait_s = self._arrivals.wait_s(self._incoming, now, wait_until - now)
                if samples >= self._max or wait_s <= 0:
                    break
                on_rate_alone = self._incoming == 0
                self._cond.wait(wait_s)
                if on_rate_alone:
                    self._arrivals.waited(brought_a_job=bool(self._queue))
            return batch

    def _take_compatible(self, batch: list[Piece], samples: int) -> int:
        """Move queued pieces that fit into ``batch`` (FIFO; caller holds _cond)."""
        signature = batch[0].signature
        kept: deque[Piece] = deque()
        while self._queue:
            piece = self._queue.popleft()
            if piece.isolated or piece.signature != signature:
                kept.append(piece)
            elif samples + piece.n <= self._max:
                batch.append(piece)
                samples += piece.n
            else:
                # First in line for the next batch: keep FIFO order.
                kept.append(piece)
                kept.extend(self._queue)
                self._queue.clear()
        self._queue = kept
        return samples

    def _run_batch(self, batch: list[Piece]) -> None:
        now = time.monotonic()
        live = []
        for piece in batch:
            request = piece.request
            if request.future.done():
                continue  # an earlier piece of it failed
            if request.deadline is not None and now > request.deadline:
                request.fail(DeadlineExceeded("the job's deadline passed before it could run"))
                continue
            if request.before_run is not None:
                hook, request.before_run = request.before_run, None
                try:
                    hook()
                except Exception as e:
                    request.fail(e if isinstance(e, PredictqError) else PredictionError(repr(e)))
                    continue
            live.append(piece)
        if live:
            self._execute(live)

    def _execute(self, pieces: list[Piece]) -> None:
        try:
            outputs = self._call(pieces)
        except DeviceOutOfMemory as e:
            self._on_oom(pieces, e)
            return
        except Exception as e:
            if len(pieces) > 1:
                # Retry alone so that only the job that causes the error fails.
                if self._on_isolate is not None:
                    self._on_isolate(len(pieces))
                for piece in pieces:
                    if not piece.request.future.done():
                        self._execute([piece])
            else:
                err = e if isinstance(e, PredictqError) else PredictionError(f"{e!r}")
                if err is not e:
                    err.__cause__ = e
                pieces[0].request.fail(err)
            return
        for piece, outs in zip(pieces, outputs, strict=True):
            piece.request.deliver(piece.offset, outs)

    def _on_oom(self, pieces: list[Piece], error: DeviceOutOfMemory) -> None:
        if len(pieces) > 1:
            mid = len(pieces) // 2
            halves: tuple[list[Piece], ...] = (pieces[:mid], pieces[mid:])
        elif pieces[0].n > 1:
            halves = tuple([h] for h in pieces[0].halves())
        else:
            pieces[0].request.fail(
                DeviceOutOfMemory(f"one sample of this job does not fit in device memory: {error}")
            )
            return
        log.warning(
            "device out of memory on %d samples; retrying in halves", sum(p.n for p in pieces)
        )
        for half in halves:
            self._execute(half)

    def _call(self, pieces: list[Piece]) -> list[list[Array]]:
        """One device call for ``pieces``; the outputs split back per piece."""
        if len(pieces) == 1:
            inputs = pieces[0].inputs
        else:
            inputs = [
                np.concatenate(cols) for cols in zip(*(p.inputs for p in pieces), strict=True)
            ]
        total = sum(p.n for p in pieces)
        started = self._call_started = time.monotonic()
        try:
            outputs = self._run(inputs)
        finally:
            self._call_started = None
        device_s = time.monotonic() - started
        for i, out in enumerate(outputs):
            if out.shape[0] != total:
                raise PredictionError(
                    f"model output {i} has {out.shape[0]} rows for a batch of {total} samples"
                )
        if self._on_batch is not None:
            oldest = min(p.request.submitted_at for p in pieces)
            self._on_batch(BatchStats(total, len(pieces), device_s, started - oldest))
        split: list[list[Array]] = []
        start = 0
        for piece in pieces:
            split.append([out[start : start + piece.n] for out in outputs])
            start += piece.n
        return split

"""Dynamic micro-batching: many concurrent jobs, one device call at a time.

Jobs running in the threads pool hand their input arrays to ``Batcher.submit``
and wait on the returned future. A single device thread takes the first waiting
piece, fills the batch with compatible pieces until ``max_batch_size`` samples
or ``batch_wait_ms`` after the first arrival, runs ONE call, and splits the
outputs back to each job.

One batcher serves every model (and model version) of a process: each request
names the ``run`` (a loaded model version) it is for, and a batch only ever
holds requests for one ``run``, so no job gets a mix of two versions' outputs.

Invariants (each has a test in tests/test_batcher.py or tests/test_registry.py):

* Only the device thread calls a ``run`` or a device task (``on_device``: the
  warm-up of a version loaded while serving): device calls are one at a time
  per process, across all its models.
* The device thread does no I/O but the device call: whatever a job needs from
  Redis happens on the job's own thread, before ``submit`` or after its result.
* Every submitted request ends with its result or its own exception, never a
  hang: per-request errors are caught around each call, and if the device thread
  itself dies, the batch it was running fails and every queued request is handed
  back with ``Requeue`` before the thread exits.
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
from typing import Any

from predictq.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    PredictionError,
    PredictqError,
    Requeue,
)
from workers.arrivals import ArrivalTracker
from workers.pieces import (
    Array,
    BatchStats,
    Piece,
    Request,
    RunFn,
    joined_inputs,
    oom_halves,
    split_outputs,
    take_compatible,
)

__all__ = ["Array", "BatchStats", "Batcher"]

log = logging.getLogger(__name__)


class Batcher:
    """Runs batches of concurrently submitted requests on one thread, one call at a time.

    ``run`` is the default model for ``submit``; each request may name its own.
    """

    def __init__(
        self,
        run: RunFn | None = None,
        *,
        max_batch_size: int,
        batch_wait_ms: float,
        on_batch: Callable[[BatchStats], None] | None = None,
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
        # Metrics only: cheap, in memory, never raise (they run on the device thread).
        self._on_batch = on_batch
        self._on_isolate = on_isolate
        # _cond guards _queue, _queued, _tasks, _incoming and _closed. Invariant: a piece (or
        # device task) enters its queue only while not _closed, and leaves it only on the
        # device thread, so after close() + join() nothing can be left pending.
        self._cond = threading.Condition()
        self._queue: deque[Piece] = deque()
        self._queued = 0  # samples in _queue: a message's submits must not each sum it
        self._tasks: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._incoming = 0
        # The device thread's wait, for ``submit`` to wake it only when needed: idle
        # for a first piece, or filling a batch of that many samples (0: not).
        self._idle = False
        self._filling = 0
        self._closed = False
        self._arrivals = ArrivalTracker()  # guarded by _cond too
        # Written only by the device thread; read without a lock by a watchdog
        # (a float assignment is atomic under the GIL).
        self._call_started: float | None = None
        # Set by the device thread as it ends (closed and drained, or crashed);
        # `_crash` is written before it, and never after.
        self._ended = threading.Event()
        self._crash: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        """Start the device thread."""
        self._thread.start()

    def call_running_s(self, now: float) -> float:
        """How long the device call in progress has run (0 when none is)."""
        started = self._call_started
        return 0.0 if started is None else now - started

    def wait_ended(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for the device thread to end; True once it has."""
        return self._ended.wait(timeout_s)

    @property
    def crash(self) -> BaseException | None:
        """What killed the device thread, if it died (None while it runs, or closed cleanly)."""
        return self._crash

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
        run: RunFn | None = None,
        labels: tuple[str, str] = ("", ""),
    ) -> Future[list[Array]]:
        """Queue one request; the future holds its outputs (one array per model output).

        ``deadline`` is a ``time.monotonic()`` instant after which the request is
        dropped with ``DeadlineExceeded`` instead of run. ``isolated`` requests run
        in batches of their own. ``run`` (default: the batcher's) computes it;
        only requests for the same ``run`` share a batch. ``labels`` come back
        in the batch's ``BatchStats``. Raises ``Requeue`` once the batcher is closed.
        """
        fn = run or self._run
        if fn is None:
            raise ValueError("submit: this batcher has no default model; pass run=")
        arrays = list(inputs)
        n = int(arrays[0].shape[0])
        request = Request(n, deadline)
        pieces = [
            Piece(
                request, start, [a[start : start + self._max] for a in arrays], isolated, fn, labels
            )
            for start in range(0, n, self._max)
        ]
        with self._cond:
            if self._closed:
                raise Requeue("the worker process is stopping and takes no new jobs")
            self._arrivals.arrived(request.submitted_at)
            self._queue.extend(pieces)
            self._queued += n
            # While jobs are announced, a device thread filling a batch waits for
            # them to end (``announce`` notifies) or for a full batch: waking it
            # for every job of a coalesced message costs a thread switch each.
            if self._idle or not self._incoming or self._filling + self._queued >= self._max:
                self._cond.notify_all()
        return request.future

    def on_device(self, task: Callable[[], Any]) -> Future[Any]:
        """Run ``task`` on the device thread, between two batches; its future holds the outcome.

        For device work that is not a batch (warming up a model version loaded
        while others serve): it keeps device calls one at a time, and the
        watchdog times it like a device call. Raises ``Requeue`` once closed.
        """
        future: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise Requeue("the worker process is stopping and takes no device work")
            self._tasks.append((task, future))
            self._cond.notify_all()
        return future

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests, finish the queued ones, join the device thread.

        Returns False if the thread did not finish within ``timeout_s``; then the
        requests still queued are handed back (``Requeue``) so that no caller
        waits forever.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._requeue_queued("the worker process stopped before this job ran")
            return False
        return True

    # --- device thread ---------------------------------------------------------

    def _loop(self) -> None:
        batch: list[Piece] = []
        try:
            while True:
                self._run_tasks()
                filled = self._next_batch()
                if filled is None:
                    return
                batch = filled
                if batch:
                    self._run_batch(batch)
                    batch = []
        except BaseException as e:
            # Invariant "never a hang": whatever killed the loop, end every
            # request it was responsible for, and refuse new ones. The batch it
            # was running fails (one of its jobs may be the cause); the queued
            # ones did nothing wrong and go back to the queue for another
            # process. Not re-raised: nobody is above this thread; whoever
            # supervises it learns of it through wait_ended() and crash.
            log.exception("device thread crashed; requeueing the jobs that had not run")
            error = PredictionError(f"the device thread crashed: {e!r}")
            for piece in batch:
                piece.request.fail(error)
            with self._cond:
                self._closed = True
            self._requeue_queued("the device thread crashed before this job ran")
            self._crash = e
        finally:
            self._ended.set()

    def _requeue_queued(self, why: str) -> None:
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            self._queued = 0
            tasks = list(self._tasks)
            self._tasks.clear()
        for piece in pending:
            piece.request.fail(Requeue(why))
        for _task, future in tasks:
            future.set_exception(Requeue(why))

    def _run_tasks(self) -> None:
        while True:
            with self._cond:
                if not self._tasks:
                    return
                task, future = self._tasks.popleft()
            self._call_started = time.monotonic()
            try:
                result = task()
            except Exception as e:
                future.set_exception(e)
            else:
                future.set_result(result)
            finally:
                self._call_started = None

    def _next_batch(self) -> list[Piece] | None:
        """Block for the first piece, then fill; empty when a device task arrived first,
        None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._tasks:
                    return []
                if self._closed:
                    return None
                self._idle = True
                self._cond.wait()
                self._idle = False
            first = self._queue.popleft()
            batch, samples = [first], first.n
            self._queued -= samples
            if first.isolated:
                return batch
            self._arrivals.new_batch()
            wait_until = time.monotonic() + self._wait_s
            while samples < self._max:
                before = samples
                samples, self._queue = take_compatible(self._queue, batch, samples, self._max)
                self._queued -= samples - before
                now = time.monotonic()
                wait_s = self._arrivals.wait_s(self._incoming, now, wait_until - now)
                if samples >= self._max or wait_s <= 0:
                    break
                on_rate_alone = self._incoming == 0
                self._filling = samples
                self._cond.wait(wait_s)
                self._filling = 0
                if on_rate_alone:
                    self._arrivals.waited(brought_a_job=bool(self._queue))
            return batch

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
        halves = oom_halves(pieces)
        if halves is None:
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
        inputs = joined_inputs(pieces)
        total = sum(p.n for p in pieces)
        started = self._call_started = time.monotonic()
        try:
            # One run per batch: take_compatible never mixes two.
            outputs = pieces[0].run(inputs)
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
            stats = BatchStats(total, len(pieces), device_s, started - oldest, pieces[0].labels)
            self._on_batch(stats)
        return split_outputs(pieces, outputs)

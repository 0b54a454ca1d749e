"""CPU device calls run as row parts on several cores at once, one compute thread each.

On CPU, TensorFlow parallelises a call inside each op (its intra-op threads).
For the small ops of an online batch that costs more than it gains: on the
2-core development machine the conv net's batch of 16 takes 11 ms with two
intra-op threads and 5.6 ms with one, and burns twice the CPU that the
worker's Celery threads, Redis and the producers need (README, Benchmark).
Splitting the batch instead, by rows, keeps every op single-threaded and still
uses every core for large batches: one intra-op thread per process, and a
batch of at least ``2 * min_rows`` rows runs as up to ``parts`` slices at the
same time (the device thread computes one, a small pool the others), whose
outputs are concatenated in order. Measured in process on that machine (conv
net, batch 1024): 80 ms in two parts vs 105 ms with two intra-op threads; the
MLP's batch of 4096: 14 vs 18 ms.

It stays one device call: the batcher's device thread starts it and returns
only when every part has finished (error or not), so device calls remain one
at a time per process. A model's outputs are batch-major (the batcher relies on
it too), so the parts' rows are the batch's rows in order. TensorFlow runs
concurrent calls of one concrete function safely; each part is its own call
with its own (batch-polymorphic) shape, so nothing is traced again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from itertools import pairwise
from typing import Any

import numpy as np

from workers.backends import CompiledCall

log = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


class Sharder:
    """Splits large batches of a process's compiled calls into parts run on several cores."""

    def __init__(self, parts: int, min_rows: int) -> None:
        if parts < 1 or min_rows < 1:
            raise ValueError(f"parts and min_rows must be >= 1, got {parts} and {min_rows}")
        self.parts = parts
        self.min_rows = min_rows
        # The device thread computes the first part itself: parts - 1 helpers.
        self._pool = (
            ThreadPoolExecutor(parts - 1, thread_name_prefix="predictq-shard")
            if parts > 1
            else None
        )

    def wrap(self, compiled: CompiledCall) -> CompiledCall:
        """``compiled`` with its large batches split (as it is when there is one part)."""
        if self._pool is None:
            return compiled
        pool, fn = self._pool, compiled.fn

        def call(*xs: Any) -> list[Array]:
            rows = int(xs[0].shape[0])
            parts = min(self.parts, rows // self.min_rows)
            if parts < 2:
                return _numpy(fn, xs)
            bounds = [rows * i // parts for i in range(parts + 1)]
            futures: list[Future[list[Array]]] = [
                pool.submit(_numpy, fn, [x[a:b] for x in xs]) for a, b in pairwise(bounds[1:])
            ]
            try:
                first = _numpy(fn, [x[: bounds[1]] for x in xs])
            finally:
                # Whatever happened to the first part, the call ends after the last one.
                wait(futures)
            outputs = [first, *(f.result() for f in futures)]
            return [np.concatenate([o[i] for o in outputs]) for i in range(len(first))]

        return CompiledCall(call, compiled.compiles, compiled.warm_sizes)

    def close(self) -> None:
        """Stop the helper threads (after the device thread has stopped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _numpy(fn: Callable[..., Sequence[Any]], xs: Sequence[Any]) -> list[Array]:
    # Converted on the thread that computed the part: the copies run in parallel too.
    return [np.asarray(o) for o in fn(*xs)]

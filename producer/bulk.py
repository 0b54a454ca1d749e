"""Bulk prediction: a large input as chunk jobs, a bounded number in flight.

Memory stays at input + output + the chunks in flight: outputs are written
into preallocated arrays as chunks finish, and a finished chunk's message is
dropped at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, wait
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from predictq.errors import InvalidInput, PredictqError
from producer import wire

if TYPE_CHECKING:
    from producer.client import PredictionClient
    from producer.job import Job

Array = np.ndarray[Any, Any]


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInput(f"chunk_size: expected an integer >= 1, received {chunk_size!r}")


def submit_chunks(
    client: PredictionClient,
    normalized: Any,
    *,
    chunk_size: int,
    deadline_s: float | None,
    window: int,
) -> Iterator[Job]:
    """One submitted job per chunk of ``chunk_size`` rows, ``window`` submitted ahead.

    Arguments are checked at once, not on the first ``next()``.
    """
    _check_chunk_size(chunk_size)
    if not isinstance(window, int) or window < 1:
        raise InvalidInput(f"window: expected an integer >= 1, received {window!r}")
    n = wire.rows(normalized)
    return _submitted_ahead(client, normalized, n, chunk_size, deadline_s, window)


def _submitted_ahead(
    client: PredictionClient,
    normalized: Any,
    n: int,
    chunk_size: int,
    deadline_s: float | None,
    window: int,
) -> Iterator[Job]:
    ahead: deque[Job] = deque()
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        ahead.append(
            client._submit(
                wire.take(normalized, start, stop), deadline_s=deadline_s, rows=slice(start, stop)
            )
        )
        if len(ahead) > window:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


class _Outputs:
    """Preallocated outputs, shaped by the first chunk that comes back."""

    def __init__(self, n: int) -> None:
        self._n = n
        self.value: Any = None

    def write(self, rows: slice, result: Any) -> None:
        if self.value is None:
            self.value = self._allocate(result)
        for target, part in zip(self._flat(self.value), self._flat(result), strict=True):
            if part.shape[0] != rows.stop - rows.start:
                raise PredictqError(
                    f"rows {rows.start}:{rows.stop}: expected {rows.stop - rows.start} output "
                    f"rows, received {part.shape[0]}"
                )
            target[rows] = part

    def _allocate(self, sample: Any) -> Any:
        def empty(a: Array) -> Array:
            return np.empty((self._n, *a.shape[1:]), dtype=a.dtype)

        if isinstance(sample, dict):
            return {k: empty(v) for k, v in sample.items()}
        if isinstance(sample, list):
            return [empty(v) for v in sample]
        return empty(sample)

    @staticmethod
    def _flat(value: Any) -> list[Array]:
        if isinstance(value, dict):
            return list(value.values())
        if isinstance(value, list):
            return value
        return [value]


def predict_chunks(
    client: PredictionClient,
    normalized: Any,
    *,
    chunk_size: int,
    progress: bool,
    timeout: float | None,
    max_in_flight: int,
) -> Any:
    """Outputs for all rows of ``normalized``, in order."""
    _check_chunk_size(chunk_size)
    n = wire.rows(normalized)
    if n == 0:
        raise InvalidInput("inputs: expected at least one row, received an empty batch")
    window = max(1, min(max_in_flight, client.settings.max_in_flight))
    outputs = _Outputs(n)
    chunks = iter(range(0, n, chunk_size))
    in_flight: dict[Any, Job] = {}
    bar = tqdm(total=n, unit="rows", disable=not progress, desc="predict", smoothing=0.1)
    try:
        while True:
            for start in chunks:
                stop = min(start + chunk_size, n)
                job = client._submit(
                    wire.take(normalized, start, stop), deadline_s=None, rows=slice(start, stop)
                )
                in_flight[job._future] = job
                if len(in_flight) >= window:
                    break
            if not in_flight:
                return outputs.value
            done, _ = wait(
                list(in_flight),
                timeout=timeout or client.settings.result_timeout_s,
                return_when=FIRST_COMPLETED,
            )
            if not done:
                # Nothing came back within the timeout: let get() raise it.
                next(iter(in_flight.values())).raw_result(timeout=1e-3)
            for future in done:
                job = in_flight.pop(future)
                assert job.rows is not None
                try:
                    outputs.write(job.rows, job.raw_result(timeout=1))
                except PredictqError as e:
                    raise type(e)(f"rows {job.rows.start}:{job.rows.stop}: {e}") from e
                bar.update(job.rows.stop - job.rows.start)
    finally:
        for job in in_flight.values():
            job.forget()
        bar.close()

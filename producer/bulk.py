"""Bulk prediction: a large input as chunk jobs, a bounded number in flight.

Memory stays at input + output + the chunks in flight: chunks are views of the
input, outputs are written into preallocated arrays as chunks finish, and a
finished chunk's message is dropped at once.

The client hands these functions its way to submit one chunk (``SubmitChunk``);
this module never imports the client.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from predictq.errors import InvalidInput, PredictqError
from predictq.structure import Layout, flatten, unflatten
from producer.job import Job, wait_any
from producer.wire import JobInput

Array = np.ndarray[Any, Any]


class SubmitChunk(Protocol):
    """Submits one chunk of the input as a job; ``rows`` says which rows it covers."""

    def __call__(self, chunk: JobInput, *, rows: slice) -> Job: ...


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInput(f"chunk_size: expected an integer >= 1, received {chunk_size!r}")


def _chunks(inputs: JobInput, chunk_size: int) -> Iterator[tuple[JobInput, slice]]:
    for start in range(0, inputs.rows, chunk_size):
        stop = min(start + chunk_size, inputs.rows)
        yield inputs.take(start, stop), slice(start, stop)


def submit_chunks(
    submit: SubmitChunk, inputs: JobInput, *, chunk_size: int, window: int
) -> Iterator[Job]:
    """One submitted job per chunk of ``chunk_size`` rows, ``window`` submitted ahead.

    Arguments are checked at once, not on the first ``next()``.
    """
    _check_chunk_size(chunk_size)
    if not isinstance(window, int) or window < 1:
        raise InvalidInput(f"window: expected an integer >= 1, received {window!r}")
    return _submitted_ahead(submit, inputs, chunk_size, window)


def _submitted_ahead(
    submit: SubmitChunk, inputs: JobInput, chunk_size: int, window: int
) -> Iterator[Job]:
    ahead: deque[Job] = deque()
    for chunk, rows in _chunks(inputs, chunk_size):
        ahead.append(submit(chunk, rows=rows))
        if len(ahead) > window:
            yield ahead.popleft()
    while ahead:
        yield ahead.popleft()


class _Outputs:
    """Preallocated outputs, shaped by the first chunk that comes back."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._layout: Layout | None = None
        self._arrays: list[Array] = []

    @property
    def value(self) -> Any:
        """The outputs in the model's structure (one array, a list, or a dict by name)."""
        assert self._layout is not None, "no chunk came back"
        return unflatten(self._layout, self._arrays)

    def write(self, rows: slice, result: Any) -> None:
        layout, parts = flatten(result)
        if self._layout is None:
            self._layout = layout
            self._arrays = [np.empty((self._n, *p.shape[1:]), dtype=p.dtype) for p in parts]
        for target, part in zip(self._arrays, parts, strict=True):
            if part.shape[0] != rows.stop - rows.start:
                raise PredictqError(
                    f"rows {rows.start}:{rows.stop}: expected {rows.stop - rows.start} output "
                    f"rows, received {part.shape[0]}"
                )
            target[rows] = part


def predict_chunks(
    submit: SubmitChunk,
    inputs: JobInput,
    *,
    chunk_size: int,
    window: int,
    progress: bool,
    timeout_s: float,
) -> Any:
    """Outputs for all rows of ``inputs``, in order, with at most ``window`` chunks unfinished.

    ``timeout_s``: the longest wait for the next chunk's result.
    """
    _check_chunk_size(chunk_size)
    if inputs.rows == 0:
        raise InvalidInput("inputs: expected at least one row, received an empty batch")
    outputs = _Outputs(inputs.rows)
    chunks = _chunks(inputs, chunk_size)
    in_flight: list[Job] = []
    bar = tqdm(total=inputs.rows, unit="rows", disable=not progress, desc="predict", smoothing=0.1)
    try:
        while True:
            for chunk, rows in chunks:
                in_flight.append(submit(chunk, rows=rows))
                if len(in_flight) >= window:
                    break
            if not in_flight:
                return outputs.value
            done = wait_any(in_flight, timeout_s)
            if not done:
                # Nothing came back within the timeout: let the oldest job raise it.
                in_flight[0].raw_result(timeout=1e-3)
            for job in done:
                in_flight.remove(job)
                assert job.rows is not None
                try:
                    outputs.write(job.rows, job.raw_result(timeout=1))
                except PredictqError as e:
                    raise type(e)(f"rows {job.rows.start}:{job.rows.stop}: {e}") from e
                bar.update(job.rows.stop - job.rows.start)
    finally:
        for job in in_flight:
            job.forget()
        bar.close()

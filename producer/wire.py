"""A job's input on the producer side: user values in, one checked ``JobInput`` out.

The producer does not know the model, so it only checks what every model
needs (numeric dtypes, a batch dimension, the same number of rows in every
input) and leaves shape checks to the worker, which answers with a precise
``InvalidInput``. The client reads what it needs to send a job (the task
argument, its size, a summary for Flower) from the ``JobInput``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from predictq.codec import check_dtype, describe
from predictq.errors import InvalidInput
from predictq.modelref import ModelRef, job_model
from predictq.structure import SINGLE, Layout, flatten, unflatten

Array = np.ndarray[Any, Any]
#: One array, a list of arrays (multi-input, in model order) or a dict by input name.
Inputs = Array | Sequence[Array] | Mapping[str, Array]


class JobInput:
    """A job's input, checked: numeric arrays with the same number of rows, in their layout."""

    def __init__(self, layout: Layout, arrays: list[Array]) -> None:
        counts = {a.shape[0] for a in arrays}
        if len(counts) != 1:
            raise InvalidInput(
                f"inputs: expected the same number of samples in every input, received {counts}"
            )
        self.layout = layout
        self.arrays = arrays
        #: Number of samples (the batch dimension).
        self.rows = int(counts.pop())
        #: Bytes of array data.
        self.nbytes = sum(a.nbytes for a in arrays)
        #: The task argument: one array, a list (multi-input) or a dict by input name.
        self.value: Array | list[Array] | dict[str, Array] = unflatten(layout, arrays)
        #: A short ``argsrepr`` for Flower and logs (never the data itself).
        self.summary = _summary(layout, arrays)

    def take(self, start: int, stop: int) -> JobInput:
        """Rows ``[start, stop)`` of every input (views, no copy), in the same layout."""
        return JobInput(self.layout, [a[start:stop] for a in self.arrays])


def _summary(layout: Layout, arrays: list[Array]) -> str:
    described = [describe(a) for a in arrays]
    if layout.structure == "dict":
        pairs = zip(layout.keys, described, strict=True)
        return "{" + ", ".join(f"{k}: {d}" for k, d in pairs) + "}"
    if layout.structure == "list":
        return "[" + ", ".join(described) + "]"
    return described[0]


def _array(value: object, where: str) -> Array:
    try:
        array = np.asarray(value)
    except ValueError as e:
        raise InvalidInput(
            f"{where}: expected a rectangular array, received a ragged one ({e})"
        ) from e
    check_dtype(array.dtype, where)
    if array.ndim < 1:
        raise InvalidInput(f"{where}: expected an array with a batch dimension, received a scalar")
    return array


def normalize(inputs: object) -> JobInput:
    """``inputs`` (one array, a list of arrays, or a dict by input name) as a checked JobInput.

    A list counts as several inputs only when every item is an ndarray; any
    other list (nested lists of numbers) is one array.
    """
    layout, values = flatten(inputs)
    arrays_listed = bool(values) and all(isinstance(v, np.ndarray) for v in values)
    if layout.structure == "list" and not arrays_listed:
        layout, values = SINGLE, [inputs]
    wheres = ["inputs"] if layout.structure == "single" else [f"input {k!r}" for k in layout.keys]
    arrays = [_array(v, where) for v, where in zip(values, wheres, strict=True)]
    if layout.structure == "dict":
        # The worker matches keys with the model's input names (strings).
        layout = Layout("dict", tuple(str(k) for k in layout.keys))
    return JobInput(layout, arrays)


def model_ref(model: str | None, version: int | None) -> ModelRef:
    """The model a submit names, checked as a worker checks a job's kwargs (modelref)."""
    return job_model({"model": model, "version": version}, where="submit")

"""Producer-side input handling: user values to wire-ready arrays, results back.

The producer does not know the model, so it only checks what every model
needs (numeric dtypes, a batch dimension, the payload limit) and leaves shape
checks to the worker, which answers with a precise ``InvalidInput``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from predictq.codec import NDARRAY_KEY, check_dtype, describe
from predictq.errors import InvalidInput, PayloadTooLarge

Array = np.ndarray[Any, Any]
#: One array, a list of arrays (multi-input, in model order) or a dict by input name.
Inputs = Array | Sequence[Array] | Mapping[str, Array]


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


def normalize(inputs: object) -> Array | list[Array] | dict[str, Array]:
    """``inputs`` as arrays: one, a list (multi-input) or a dict by input name."""
    if isinstance(inputs, Mapping) and NDARRAY_KEY not in inputs:
        return {str(k): _array(v, f"input {k!r}") for k, v in inputs.items()}
    if (
        isinstance(inputs, list | tuple)
        and inputs
        and all(isinstance(v, np.ndarray) for v in inputs)
    ):
        return [_array(v, f"input {i}") for i, v in enumerate(inputs)]
    return _array(inputs, "inputs")


def arrays_of(normalized: Array | list[Array] | dict[str, Array]) -> list[Array]:
    """The arrays inside a normalized input."""
    if isinstance(normalized, dict):
        return list(normalized.values())
    if isinstance(normalized, list):
        return normalized
    return [normalized]


def rows(normalized: Array | list[Array] | dict[str, Array]) -> int:
    """Number of samples (the batch dimension), checked equal across inputs."""
    counts = {a.shape[0] for a in arrays_of(normalized)}
    if len(counts) != 1:
        raise InvalidInput(
            f"inputs: expected the same number of samples in every input, received {counts}"
        )
    return int(counts.pop())


def take(normalized: Array | list[Array] | dict[str, Array], start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of every input, in the same structure."""
    if isinstance(normalized, dict):
        return {k: v[start:stop] for k, v in normalized.items()}
    if isinstance(normalized, list):
        return [v[start:stop] for v in normalized]
    return normalized[start:stop]


def check_size(normalized: Array | list[Array] | dict[str, Array], limit_bytes: int) -> None:
    """Refuse a job that the workers would refuse, before it is sent."""
    total = sum(a.nbytes for a in arrays_of(normalized))
    if total > limit_bytes:
        raise PayloadTooLarge(
            f"inputs: expected at most {limit_bytes} bytes per job (PREDICTQ_MAX_PAYLOAD_BYTES), "
            f"received {total} bytes; use predict_many() to split it"
        )


def summary(normalized: Array | list[Array] | dict[str, Array]) -> str:
    """A short ``argsrepr`` for Flower and logs (never the data itself)."""
    if isinstance(normalized, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in normalized.items()) + "}"
    if isinstance(normalized, list):
        return "[" + ", ".join(describe(v) for v in normalized) + "]"
    return describe(normalized)


def writable(value: object) -> object:
    """Decoded results share the message buffer (read-only): give callers their own copy."""
    if isinstance(value, np.ndarray):
        return np.array(value)
    if isinstance(value, dict):
        return {k: writable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [writable(v) for v in value]
    return value

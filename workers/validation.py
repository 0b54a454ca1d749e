"""Turn a job's raw input into the arrays the model takes, or raise InvalidInput.

A job's input may be one array (single-input models), a list of arrays in the
model's input order, or a dict of arrays by input name. Each array may arrive as
an ndarray (msgpack wire format), an ``__ndarray__`` map with base64 data (JSON)
or nested lists (JSON). Every error names what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from predictq.codec import NDARRAY_KEY, check_dtype, decode_array, describe
from predictq.errors import InvalidInput
from predictq.structure import flatten
from workers.spec import ModelSpec, TensorSpec

Array = np.ndarray[Any, Any]


def to_array(value: object, where: str) -> Array:
    """One input value as an ndarray, refusing ragged, string and object data."""
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, dict) and NDARRAY_KEY in value:
        array = decode_array(value)
    elif isinstance(value, list | tuple):
        try:
            array = np.asarray(value)
        except ValueError as e:
            # numpy >= 1.24 refuses ragged nesting ("inhomogeneous shape").
            raise InvalidInput(
                f"{where}: expected a rectangular nested list of numbers, "
                f"received a ragged nested list ({e})"
            ) from e
    else:
        raise InvalidInput(
            f"{where}: expected an array (ndarray, __ndarray__ map or nested list), "
            f"received {describe(value)}"
        )
    check_dtype(array.dtype, where)
    return array


def split_inputs(raw: object, spec: ModelSpec) -> list[object]:
    """The raw values for each model input, in the model's input order."""
    names = spec.input_names
    layout, values = flatten(raw)
    if layout.structure == "dict":
        missing = [n for n in names if n not in layout.keys]
        extra = sorted(str(k) for k in layout.keys if k not in names)
        if missing or extra:
            raise InvalidInput(
                f"inputs: expected keys {names}, received keys {sorted(map(str, layout.keys))}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unexpected {extra})" if extra else "")
            )
        return flatten(raw, order=names)[1]
    if len(names) == 1:
        return [raw]  # one array, in any form (nested lists included)
    if layout.structure == "list" and len(values) == len(names):
        return values
    raise InvalidInput(
        f"inputs: the model has {len(names)} inputs {names}; expected a list of "
        f"{len(names)} arrays or a dict by name, received {describe(raw)}"
    )


def conform(array: Array, spec: TensorSpec, *, allow_nonfinite: bool) -> Array:
    """``array`` checked against ``spec`` and cast to its dtype when that is safe."""
    where = f"input {spec.name!r}"
    if array.ndim != len(spec.shape):
        raise InvalidInput(
            f"{where}: expected rank {len(spec.shape)} with shape {_dims(spec.shape)}, "
            f"received rank {array.ndim} with shape {list(array.shape)}"
        )
    for got, want in zip(array.shape[1:], spec.feature_shape, strict=True):
        if want is not None and got != want:
            raise InvalidInput(
                f"{where}: expected shape {_dims(spec.shape)}, received {list(array.shape)}"
            )
    if array.dtype != spec.dtype:
        # same_kind allows float64 -> float32 and int -> float, never float -> int
        # or anything -> bool: those would silently change the data's meaning.
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
            raise InvalidInput(
                f"{where}: expected dtype {spec.dtype.name} (or one that casts to it safely), "
                f"received {array.dtype.name}"
            )
        _check_range(array, spec.dtype, where)
        array = array.astype(spec.dtype)
    if not allow_nonfinite and array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InvalidInput(
            f"{where}: expected finite values, received {bad} NaN/Inf value(s) "
            f"(set PREDICTQ_ALLOW_NONFINITE=true to accept them)"
        )
    return array


def _check_range(array: Array, target: np.dtype[Any], where: str) -> None:
    """Refuse values a narrowing cast would wrap (ints) or turn into inf (floats)."""
    if array.size == 0 or np.can_cast(array.dtype, target, casting="safe"):
        return
    if target.kind in "iu":
        info = np.iinfo(target)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise InvalidInput(
                f"{where}: expected {target.name} values in [{info.min}, {info.max}], "
                f"received values in [{low}, {high}]"
            )
    elif target.kind == "f":
        largest = np.max(np.abs(array), initial=0, where=np.isfinite(array))
        if largest > np.finfo(target).max:
            raise InvalidInput(
                f"{where}: expected {target.name} values within +-{np.finfo(target).max:.4g}, "
                f"received a value of magnitude {largest:.4g}"
            )


def validate(
    raw: object, spec: ModelSpec, *, allow_nonfinite: bool, max_job_samples: int
) -> list[Array]:
    """The job's input arrays in model order, all with the same number of samples."""
    values = split_inputs(raw, spec)
    arrays = [
        conform(to_array(v, f"input {s.name!r}"), s, allow_nonfinite=allow_nonfinite)
        for v, s in zip(values, spec.inputs, strict=True)
    ]
    counts = {a.shape[0] for a in arrays}
    if len(counts) != 1:
        raise InvalidInput(
            f"inputs: expected the same number of samples in every input, received "
            f"{dict(zip(spec.input_names, (a.shape[0] for a in arrays), strict=True))}"
        )
    (n,) = counts
    if n == 0:
        raise InvalidInput("inputs: expected at least one sample, received an empty batch (0 rows)")
    if n > max_job_samples:
        raise InvalidInput(
            f"inputs: expected at most {max_job_samples} samples per job "
            f"(PREDICTQ_MAX_JOB_SAMPLES), received {n}"
        )
    return arrays


def _dims(shape: Sequence[int | None]) -> str:
    return (
        "["
        + ", ".join("N" if i == 0 else ("*" if d is None else str(d)) for i, d in enumerate(shape))
        + "]"
    )

"""Job input validation against a model spec (pure unit tests)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from predictq.errors import InvalidInput
from workers.spec import ModelSpec, TensorSpec
from workers.validation import validate

SINGLE = ModelSpec(
    "m.keras",
    "keras",
    (TensorSpec("x", (None, 4), np.dtype("float32")),),
    (TensorSpec("y", (None, 2), np.dtype("float32")),),
    "single",
    "single",
)
MULTI = ModelSpec(
    "m.keras",
    "keras",
    (
        TensorSpec("a", (None, 2), np.dtype("float32")),
        TensorSpec("b", (None, 3, None), np.dtype("int32")),
    ),
    (TensorSpec("y", (None, 1), np.dtype("float32")),),
    "dict",
    "single",
)


def check(raw: object, spec: ModelSpec = SINGLE, **kw: object) -> list[np.ndarray]:
    return validate(
        raw,
        spec,
        allow_nonfinite=bool(kw.get("allow_nonfinite", False)),
        max_job_samples=int(kw.get("max_job_samples", 100)),
    )  # type: ignore[call-overload]


def test_valid_inputs_in_every_accepted_form() -> None:
    x = np.ones((3, 4), np.float32)
    assert check(x)[0].shape == (3, 4)
    assert check(x.tolist())[0].dtype == np.float32  # JSON lists, cast from float64
    assert check({"x": x})[0].shape == (3, 4)
    b64 = {
        "__ndarray__": 1,
        "dtype": "<f4",
        "shape": [3, 4],
        "data": base64.b64encode(x.tobytes()).decode(),
    }
    assert np.array_equal(check(b64)[0], x)
    a, b = check({"a": np.zeros((2, 2)), "b": np.zeros((2, 3, 7), np.int64)}, MULTI)
    assert a.dtype == np.float32 and b.dtype == np.int32 and b.shape == (2, 3, 7)
    assert len(check([np.zeros((2, 2)), np.zeros((2, 3, 1), np.int32)], MULTI)) == 2


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (np.ones(4, np.float32), r"expected rank 2 with shape \[N, 4\], received rank 1"),
        (np.ones((2, 5), np.float32), r"expected shape \[N, 4\], received \[2, 5\]"),
        (np.ones((2, 4), np.int64).astype(np.float32).astype("U3"), "expected a numeric dtype"),
        (np.ones((1, 4), complex), "expected a numeric dtype"),
        (np.zeros((0, 4), np.float32), "received an empty batch"),
        ([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], "ragged nested list"),
        ([["a", "b", "c", "d"]], "expected a numeric dtype"),
        (np.array([[np.nan, 0, 0, 0]], np.float32), "expected finite values, received 1 NaN/Inf"),
        (np.array([[np.inf, -np.inf, 0, 0]]), "received 2 NaN/Inf"),
        (np.ones((101, 4), np.float32), r"expected at most 100 samples per job .* received 101"),
        (np.ones((1, 4), np.float32) > 0, None),
        ("hello", "expected an array .* received str"),
        ({"y": np.ones((1, 4))}, r"expected keys \['x'\], received keys \['y'\]"),
    ],
)
def test_bad_inputs_name_what_was_expected_and_what_arrived(
    raw: object, message: str | None
) -> None:
    if message is None:  # bool -> float32 is a safe cast, accepted
        assert check(raw)[0].dtype == np.float32
        return
    with pytest.raises(InvalidInput, match=message):
        check(raw)


def test_unsafe_casts_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"expected dtype int32 .* received float64"):
        check({"a": np.zeros((1, 2)), "b": np.zeros((1, 3, 1))}, MULTI)


def test_narrowing_casts_that_would_change_values_are_refused() -> None:
    ok = {"a": np.zeros((1, 2)), "b": np.full((1, 3, 1), 2**31 - 1, np.int64)}
    assert check(ok, MULTI)[1].dtype == np.int32  # in range: cast
    wraps = {"a": np.zeros((1, 2)), "b": np.full((1, 3, 1), 2**31, np.int64)}
    with pytest.raises(InvalidInput, match=r"expected int32 values in \[-2147483648, 2147483647\]"):
        check(wraps, MULTI)
    with pytest.raises(InvalidInput, match=r"expected float32 values within .* magnitude 1e\+300"):
        check(np.array([[1e300, 0, 0, 0]]))
    # inf stays inf (refused or allowed by the non-finite policy), not a range error.
    assert np.isinf(check(np.array([[np.inf, 0, 0, 0]]), allow_nonfinite=True)[0][0, 0])


def test_multi_input_jobs_need_every_input_with_the_same_batch() -> None:
    with pytest.raises(InvalidInput, match="missing"):
        check({"a": np.zeros((1, 2))}, MULTI)
    with pytest.raises(InvalidInput, match="unexpected"):
        check({"a": np.zeros((1, 2)), "b": np.zeros((1, 3, 1), np.int32), "c": 1}, MULTI)
    with pytest.raises(InvalidInput, match="same number of samples"):
        check({"a": np.zeros((1, 2)), "b": np.zeros((2, 3, 1), np.int32)}, MULTI)
    with pytest.raises(InvalidInput, match="expected a list of 2 arrays or a dict"):
        check(np.zeros((1, 2)), MULTI)


def test_nonfinite_values_pass_when_allowed() -> None:
    x = np.array([[np.nan, 1, 2, 3]], np.float32)
    assert np.isnan(check(x, allow_nonfinite=True)[0][0, 0])

"""One array, a list, or a dict by name: flatten/unflatten and the producer's JobInput (pure)."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from predictq.errors import InvalidInput
from predictq.structure import Layout, flatten, unflatten
from producer import bulk, wire
from producer.job import Job

A = np.arange(6, dtype=np.float32).reshape(3, 2)
B = np.ones((3, 4), np.int32)


@pytest.mark.parametrize("value", [A, [A, B], {"b": B, "a": A}], ids=["single", "list", "dict"])
def test_unflatten_puts_back_what_flatten_took_apart(value: Any) -> None:
    layout, leaves = flatten(value)
    assert all(isinstance(leaf, np.ndarray) for leaf in leaves)
    rebuilt = unflatten(layout, leaves)
    assert type(rebuilt) is type(value)
    if isinstance(value, dict):
        assert list(rebuilt) == ["b", "a"]  # the dict's own order
    assert all(x is y for x, y in zip(flatten(rebuilt)[1], leaves, strict=True))


def test_an_ndarray_map_is_one_array_and_order_picks_a_dicts_values() -> None:
    wire_form = {"__ndarray__": 1, "dtype": "<f4", "shape": [0], "data": b""}
    assert flatten(wire_form) == (Layout("single"), [wire_form])
    layout, leaves = flatten({"b": B, "a": A}, order=["a", "b"])
    assert layout.keys == ("a", "b") and leaves[0] is A
    with pytest.raises(KeyError):
        flatten({"a": A}, order=["a", "b"])
    with pytest.raises(ValueError, match="unpack"):
        unflatten(Layout("single"), [A, B])


def test_job_input_keeps_the_callers_structure_and_chunks_are_views() -> None:
    listed = wire.normalize((A, B))
    assert isinstance(listed.value, list) and listed.rows == 3
    assert listed.nbytes == A.nbytes + B.nbytes
    assert listed.summary == (
        "[array of dtype float32 and shape (3, 2), array of dtype int32 and shape (3, 4)]"
    )
    named = wire.normalize({"a": A, 1: B}).take(1, 3)
    assert isinstance(named.value, dict) and list(named.value) == ["a", "1"]
    assert named.rows == 2 and np.shares_memory(named.value["a"], A)
    assert named.summary.startswith("{a: array of dtype float32 and shape (2, 2), 1: ")
    nested = wire.normalize([[1.0, 2.0], [3.0, 4.0]])  # nested lists: one array
    assert isinstance(nested.value, np.ndarray) and nested.value.shape == (2, 2)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([A, B[:2]], r"same number of samples in every input, received \{2, 3\}"),
        ({"a": A, "b": np.float32(1)}, "input 'b': expected an array with a batch dimension"),
        ([A, np.array(["x"])], "input 1: expected a numeric dtype"),
        ({}, "same number of samples in every input, received set()"),
    ],
)
def test_job_input_refuses_what_no_model_takes(inputs: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        wire.normalize(inputs)


def test_predict_chunks_reassembles_dict_outputs_in_row_order() -> None:
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    submitted: list[slice] = []

    def submit(chunk: wire.JobInput, *, rows: slice) -> Job:
        submitted.append(rows)
        future: Future[dict[str, Any]] = Future()
        value = chunk.value
        assert isinstance(value, np.ndarray)
        future.set_result({"status": "SUCCESS", "result": {"double": value * 2, "id": value}})
        return Job(str(rows), future, default_timeout_s=1, forget=lambda _: None, rows=rows)

    out = bulk.predict_chunks(
        submit, wire.normalize(x), chunk_size=3, window=2, progress=False, timeout_s=1
    )
    assert submitted == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert list(out) == ["double", "id"]
    assert np.array_equal(out["double"], x * 2) and np.array_equal(out["id"], x)
